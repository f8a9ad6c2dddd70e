"""What attn_bench.py and attn_sweep.py share: the attention applied at every layer of one
jitted program, and that program's GPU kernel time per kernel from a profiler trace."""
import collections, glob, gzip, json, tempfile
import jax


def unrolled(module, num_layers, interpret):
  """A jitted program calling `module.cache_attention_pallas` once per layer (unrolled, as the
  accelerator path does) on packed q/k/v: (q_list, cache_k, cache_v, start) -> L outputs."""
  def f(q_list, ck, cv, start):
    return tuple(module.cache_attention_pallas(q_list[i], None, None, ck, cv, i, start,
                                               interpret=interpret)
                 for i in range(num_layers))
  return jax.jit(f)


def kernel_microseconds(fn, args, calls):
  """Kernel name -> GPU microseconds per call of `fn(*args)`, over `calls` traced calls."""
  folder = tempfile.mkdtemp()
  with jax.profiler.trace(folder, create_perfetto_trace=True):
    for _ in range(calls):
      jax.block_until_ready(fn(*args))
  (path,) = glob.glob(f'{folder}/**/*perfetto_trace.json.gz', recursive=True)
  ev = json.load(gzip.open(path))['traceEvents']
  names = {e['pid']: e['args']['name'] for e in ev
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  agg = collections.defaultdict(float)
  for e in ev:
    if e.get('ph') == 'X' and 'GPU' in names.get(e['pid'], ''):
      agg[e['name']] += e['dur'] / calls
  return agg
