"""What attn_bench.py and attn_sweep.py share: the inputs of a decode pass's attention, the
attention applied at every layer of one jitted program, and that program's GPU kernel time per
kernel from a profiler trace."""
import collections, glob, gzip, json, tempfile
import jax, jax.numpy as jnp, numpy as np


def decode_inputs(L, KV, H, hd, capacity, start, T):
  """`unrolled`'s arguments, random bf16 (seed 0): L layers' packed q/k/v for a T-row pass,
  a cache of `capacity` positions, the pass's start."""
  rng = np.random.default_rng(0)
  ck, cv = (jnp.asarray(rng.standard_normal((L, 1, capacity, KV, hd)), jnp.bfloat16)
            for _ in range(2))
  qs = [jnp.asarray(rng.standard_normal((1, T, 1, H + 2 * KV, hd)), jnp.bfloat16)
        for _ in range(L)]
  return qs, ck, cv, jnp.int32(start)


def unrolled(module, num_layers, interpret, **kwargs):
  """A jitted program calling `module.cache_attention_pallas` once per layer (unrolled, as the
  accelerator path does) on packed q/k/v, with `kwargs` (`num_rows`):
  (q_list, cache_k, cache_v, start) -> L outputs."""
  def f(q_list, ck, cv, start):
    return tuple(module.cache_attention_pallas(q_list[i], None, None, ck, cv, i, start,
                                               interpret=interpret, **kwargs)
                 for i in range(num_layers))
  return jax.jit(f)


def kernel_events(fn, args, calls):
  """(kernel name, GPU microseconds) of every kernel that `calls` traced calls of `fn(*args)`
  ran."""
  folder = tempfile.mkdtemp()
  with jax.profiler.trace(folder, create_perfetto_trace=True):
    for _ in range(calls):
      jax.block_until_ready(fn(*args))
  (path,) = glob.glob(f'{folder}/**/*perfetto_trace.json.gz', recursive=True)
  ev = json.load(gzip.open(path))['traceEvents']
  names = {e['pid']: e['args']['name'] for e in ev
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  return [(e['name'], e['dur']) for e in ev
          if e.get('ph') == 'X' and 'GPU' in names.get(e['pid'], '')]


def kernel_microseconds(fn, args, calls):
  """Kernel name -> GPU microseconds per call of `fn(*args)`, over `calls` traced calls."""
  agg = collections.defaultdict(float)
  for name, dur in kernel_events(fn, args, calls):
    agg[name] += dur / calls
  return agg
