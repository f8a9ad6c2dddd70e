"""A SmolLM2-135M layer's four weight products at 16 rows, each with what follows it in the
layer: XLA's kernels against one Pallas (Triton) kernel that does the product and its neighbour
(o + residual, gate/up + SiLU(gate) * up, down + residual; q/k/v alone). GPU kernel time per
chain from a profiler trace, summed over all of a chain's kernels, weights copied past the L2.
Writes smol_products_<D>.json under $OUT; DIMS=D,F,QKV picks another shape (hidden size,
MLP width, q/k/v width; default SmolLM2-135M's 576,1536,960)."""
import functools, itertools, json, os, sys
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..', 'attention_fold'))
import gpu_trace

M = 16
D, F, QKV = [int(v) for v in os.environ.get('DIMS', '576,1536,960').split(',')]
CHAINS = {'qkv': (D, QKV), 'o_res': (D, D), 'gate_up_silu': (D, F), 'down_res': (F, D)}

def _acc(x_ref, w_ref, bk, nk, off=0):
  def body(i, acc):
    x = x_ref[:, pl.ds(off + i * bk, bk)]
    w = w_ref[pl.ds(i * bk, bk), :]
    return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)
  return lax.fori_loop(0, nk, body, jnp.zeros((M, w_ref.shape[-1]), jnp.float32))

def k_plain(x_ref, w_ref, o_ref, *, bk, nk):
  o_ref[...] = _acc(x_ref, w_ref, bk, nk).astype(o_ref.dtype)

def k_res(x_ref, w_ref, r_ref, o_ref, *, bk, nk):
  y = _acc(x_ref, w_ref, bk, nk).astype(o_ref.dtype)
  o_ref[...] = (r_ref[...].astype(jnp.float32) + y.astype(jnp.float32)).astype(o_ref.dtype)

def k_swiglu(x_ref, g_ref, u_ref, o_ref, *, bk, nk):
  g = _acc(x_ref, g_ref, bk, nk).astype(o_ref.dtype).astype(jnp.float32)
  u = _acc(x_ref, u_ref, bk, nk).astype(o_ref.dtype).astype(jnp.float32)
  o_ref[...] = ((g * jax.nn.sigmoid(g)).astype(o_ref.dtype).astype(jnp.float32) * u).astype(o_ref.dtype)

def call(kind, x, w, r, *, bn, bk, stages, warps):
  K = x.shape[1]
  N = w.shape[1] // 2 if kind == 'gate_up_silu' else w.shape[1]
  cp = plgpu.CompilerParams(num_warps=warps, num_stages=stages)
  xspec = pl.BlockSpec((M, K), lambda j: (0, 0))
  wspec = pl.BlockSpec((K, bn), lambda j: (0, j))
  ospec = pl.BlockSpec((M, bn), lambda j: (0, j))
  out = jax.ShapeDtypeStruct((M, N), x.dtype)
  kw = dict(bk=bk, nk=K // bk)
  if kind == 'qkv':
    return pl.pallas_call(functools.partial(k_plain, **kw), grid=(N // bn,), in_specs=[xspec, wspec],
                          out_specs=ospec, out_shape=out, compiler_params=cp)(x, w)
  if kind in ('o_res', 'down_res'):
    return pl.pallas_call(functools.partial(k_res, **kw), grid=(N // bn,), in_specs=[xspec, wspec, ospec],
                          out_specs=ospec, out_shape=out, compiler_params=cp)(x, w, r)
  uspec = pl.BlockSpec((K, bn), lambda j: (0, j + N // bn))
  return pl.pallas_call(functools.partial(k_swiglu, **kw), grid=(N // bn,), in_specs=[xspec, wspec, uspec],
                        out_specs=ospec, out_shape=out, compiler_params=cp)(x, w, w)

def xla(kind, x, w, r):
  if kind == 'qkv':
    return x @ w
  if kind == 'gate_up_silu':
    g, u = jnp.split(x @ w, 2, axis=-1)
    return jax.nn.silu(g) * u
  return r + x @ w

def main():
  reps = int(os.environ.get('REPS', 5))
  results = []
  key = jax.random.key(0)
  for name, (K, N) in CHAINS.items():
    Nw = 2 * N if name == 'gate_up_silu' else N
    R = max(8, int(np.ceil(200e6 / (K * Nw * 2))))
    ws = [jax.random.normal(jax.random.fold_in(key, r), (K, Nw), jnp.bfloat16) * 0.05 for r in range(R)]
    xs = [jax.random.normal(jax.random.fold_in(key, 10**4 + r), (M, K), jnp.bfloat16) for r in range(R)]
    rs = [jax.random.normal(jax.random.fold_in(key, 10**5 + r), (M, N), jnp.bfloat16) for r in range(R)]
    def run(fn):
      return jax.jit(lambda xs, ws, rs: tuple(fn(x, w, r) for x, w, r in zip(xs, ws, rs)))
    ref = None
    variants = [('xla', functools.partial(xla, name))]
    for bn, bk, stages, warps in itertools.product((16, 32, 64), (64, 128, 256), (2, 4), (2, 4)):
      if N % bn or K % bk:
        continue
      variants.append((f'pallas bn{bn} bk{bk} st{stages} w{warps}',
                       functools.partial(call, name, bn=bn, bk=bk, stages=stages, warps=warps)))
    for label, fn in variants:
      try:
        f = run(fn)
        out = jax.block_until_ready(f(xs, ws, rs))
        for _ in range(2):
          jax.block_until_ready(f(xs, ws, rs))
        us = sum(gpu_trace.kernel_microseconds(f, (xs, ws, rs), reps).values()) / R
      except Exception as e:  # noqa: BLE001 (a config Triton rejects)
        print(name, label, 'failed', str(e)[:160], flush=True); continue
      o0 = np.asarray(out[0].astype(jnp.float32))
      if ref is None:
        ref = o0
      row = dict(chain=name, K=K, N=N, variant=label, us=us, frac=K * Nw * 2 / (us * 1e-6) / 4.8e12,
                 maxdiff_vs_xla=float(np.max(np.abs(o0 - ref))))
      print(json.dumps(row), flush=True); results.append(row)
    del ws, xs, rs
  with open(os.path.join(os.environ.get('OUT', '.'), f'smol_products_{D}.json'), 'w') as fh:
    json.dump(results, fh, indent=1)
  for name in CHAINS:
    rows = [r for r in results if r['chain'] == name]
    if rows:
      best = min(rows, key=lambda r: r['us'])
      print(f"{name}: xla {rows[0]['us']:.2f} us; best {best['variant']} {best['us']:.2f} us")

if __name__ == '__main__':
  main()
