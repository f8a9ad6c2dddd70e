"""The four weight products of a 16-row pass at the LLaMA-3-8B shape: XLA's kernels against a
Pallas (Triton) kernel that streams the weight once, over its tile sizes, stages and a split of
the sum in two. GPU kernel time per product from a profiler trace (several copies of the weight,
more than the L2 holds, each with its own input rows); fraction of 4.8 TB/s. Writes
gemm_micro.json under $OUT."""
import functools, glob, gzip, itertools, json, os, tempfile
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

M = 16
SHAPES = {'qkv': (4096, 6144), 'o': (4096, 4096), 'gate_up': (4096, 28672), 'down': (14336, 4096)}
BW = 4.8e12

def kernel(x_ref, w_ref, o_ref, *, bk, nk):
  acc = jnp.zeros((M, o_ref.shape[-1]), jnp.float32)
  def body(i, acc):
    x = x_ref[:, pl.ds(i * bk, bk)]
    w = w_ref[pl.ds(i * bk, bk), :]
    return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)
  acc = lax.fori_loop(0, nk, body, acc)
  o_ref[...] = acc.astype(o_ref.dtype)

def pallas_matmul(x, w, *, bn, bk, stages, warps, splitk):
  K, N = w.shape
  ks = K // splitk
  out_dtype = x.dtype if splitk == 1 else jnp.float32
  out = pl.pallas_call(
      functools.partial(kernel, bk=bk, nk=ks // bk),
      grid=(N // bn, splitk),
      in_specs=[pl.BlockSpec((M, ks), lambda j, s: (0, s)),
                pl.BlockSpec((ks, bn), lambda j, s: (s, j))],
      out_specs=pl.BlockSpec((None, M, bn), lambda j, s: (s, 0, j)),
      out_shape=jax.ShapeDtypeStruct((splitk, M, N), out_dtype),
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
  )(x, w)
  return out[0] if splitk == 1 else out.sum(0).astype(x.dtype)

def gpu_busy_s(folder):
  """Summed GPU kernel time in a profiler trace (seconds)."""
  (path,) = glob.glob(os.path.join(folder, '**', '*.trace.json.gz'), recursive=True)
  ev = json.load(gzip.open(path))['traceEvents']
  names = {e['pid']: e['args']['name'] for e in ev
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  return sum(e['dur'] for e in ev if e.get('ph') == 'X'
             and 'GPU' in names.get(e['pid'], '')) * 1e-6

def timed(fn, args, reps):
  """(GPU kernel seconds per program run, from a trace of `reps` runs; the first output)."""
  f = jax.jit(fn)
  out = jax.block_until_ready(f(*args))
  for _ in range(3):
    jax.block_until_ready(f(*args))
  folder = tempfile.mkdtemp()
  with jax.profiler.trace(folder):
    for _ in range(reps):
      jax.block_until_ready(f(*args))
  return gpu_busy_s(folder) / reps, out

def main():
  reps = int(os.environ.get('REPS', 20))
  only = os.environ.get('SHAPES', ','.join(SHAPES)).split(',')
  results = []
  key = jax.random.key(0)
  for name in only:
    K, N = SHAPES[name]
    R = max(4, int(np.ceil(400e6 / (K * N * 2))))  # > 8x the L2 in weights
    ws = [jax.random.normal(jax.random.fold_in(key, r), (K, N), jnp.bfloat16) * 0.02 for r in range(R)]
    # One input row block per weight: XLA merges products that share an operand.
    xs = [jax.random.normal(jax.random.fold_in(key, 1000 + r), (M, K), jnp.bfloat16) for r in range(R)]
    ref = (xs[0].astype(jnp.float32) @ ws[0].astype(jnp.float32))
    def run(matmul):
      return lambda xs, *ws: tuple(matmul(x, w) for x, w in zip(xs, ws))
    byts = K * N * 2
    t, outs = timed(run(lambda x, w: x @ w), (xs, *ws), reps)
    row = dict(shape=name, K=K, N=N, variant='xla', us=t / R * 1e6, frac=byts / (t / R) / BW,
               err=float(jnp.max(jnp.abs(outs[0].astype(jnp.float32) - ref))))
    print(json.dumps(row), flush=True); results.append(row)
    for bn, bk, stages, splitk in itertools.product((32, 64, 128), (128, 256), (3, 4), (1, 2)):
      if N % bn or (K // splitk) % bk:
        continue
      fn = functools.partial(pallas_matmul, bn=bn, bk=bk, stages=stages, warps=4, splitk=splitk)
      try:
        t, outs = timed(run(fn), (xs, *ws), reps)
      except Exception as e:  # noqa: BLE001 (a config Triton rejects)
        print(name, bn, bk, stages, splitk, 'failed', str(e)[:200], flush=True); continue
      row = dict(shape=name, K=K, N=N, variant=f'pallas bn{bn} bk{bk} st{stages} sk{splitk}',
                 us=t / R * 1e6, frac=byts / (t / R) / BW,
                 err=float(jnp.max(jnp.abs(outs[0].astype(jnp.float32) - ref))))
      print(json.dumps(row), flush=True); results.append(row)
    del ws
  with open(os.path.join(os.environ.get('OUT', '.'), 'gemm_micro.json'), 'w') as f:
    json.dump(results, f, indent=1)
  for name in only:
    rows = [r for r in results if r['shape'] == name]
    best = min(rows, key=lambda r: r['us'])
    xla = rows[0]
    print(f"{name}: xla {xla['us']:.1f} us ({xla['frac']:.0%}); best {best['variant']} {best['us']:.1f} us ({best['frac']:.0%})")

if __name__ == '__main__':
  main()
