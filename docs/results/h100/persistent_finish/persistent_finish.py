"""Probe: a layer's closing half (o product, residual, MLP norm, gate/up, SiLU(gate) * up, down,
residual: `model._finish_layer`) as ONE Pallas (Triton) kernel whose programs meet at grid
barriers, against XLA's kernels for the same computation, at 16 rows (a GPU pass's width).

The persistent kernel runs three phases over a grid no larger than the GPU's multiprocessors:
(1) the o product's column blocks plus the residual, (2) the MLP norm and the gate/up blocks
with SiLU(gate) * up, (3) the down product's column blocks plus the residual. Between phases
every program adds one to an atomic counter and polls it until all have arrived; the next
phase's weight tile (which does not depend on the activations) is loaded before the wait, so
its memory latency overlaps the barrier. Activations written by other programs are read past
L1 (volatile loads).

`split`: the same three phases as three kernels without barriers (their results must equal the
persistent kernel's bit for bit: a check of the barriers). `xla`: the library's own arithmetic
(`model._finish_layer`, fused gate/up as the library lays it out).

A chain of L layers (distinct weights, more bytes than the L2) per jitted call, timed in turns;
prints microseconds a layer. OUT=<folder> PRESET=smollm2-135m python persistent_finish.py
"""
import functools, json, os, time
import numpy as np
import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from clasp_jax import model
from clasp_jax.configs import models

ROWS = 16      # a GPU pass's rows
BLOCK = 16     # output columns (or hidden units) a program computes per phase
SPIN_LIMIT = 1 << 20
INTERPRET = os.environ.get('INTERPRET', str(int(jax.default_backend() == 'cpu'))) == '1'


def _pieces(n):
  """n as power-of-two widths, largest first: 576 -> (0, 512), (512, 64)."""
  out, start = [], 0
  for b in reversed(range(n.bit_length())):
    if n & (1 << b):
      out.append((start, 1 << b)); start += 1 << b
  return out


def _load_tile(ref, row0, width, volatile=False):
  """Rows [row0, row0 + 16) of a [N, width] ref, as power-of-two pieces along width."""
  return [plgpu.load(ref.at[pl.ds(row0, ROWS), pl.ds(k0, kw)], volatile=volatile)
          for k0, kw in _pieces(width)]


def _load_weight(ref, n0, width, layout):
  """Output columns [n0, n0 + 16) of a weight over `width` inputs: from [N, K] ('nk', rows of
  the tile contiguous) or [K, N] ('kn', the library's layout: 32 bytes a row)."""
  if layout == 'nk':
    return _load_tile(ref, n0, width)
  return [plgpu.load(ref.at[pl.ds(k0, kw), pl.ds(n0, BLOCK)]) for k0, kw in _pieces(width)]


def _dot(xs, ws, layout='nk'):
  """sum_k x[16, k] w[k, 16] over the pieces, float32 [16, 16]."""
  acc = None
  for x, w in zip(xs, ws):
    d = plgpu.dot(x, w, trans_b=layout == 'nk').astype(jnp.float32)
    acc = d if acc is None else acc + d
  return acc


def _barrier(ctr_ref, i, num_programs):
  """Every program waits here until all `num_programs` have arrived (counter `i`). The CTA
  barrier orders the program's stores before its one thread's atomic add (release, GPU
  scope); the polls are atomics too (acquire). A bounded spin: a grid larger than what the GPU
  holds at once would give wrong results, not a hang (the bit-equality check shows them)."""
  plgpu.debug_barrier()
  arrived = plgpu.atomic_add(ctr_ref, i, jnp.int32(1)) + 1
  def cond(c):
    return (c[0] < num_programs) & (c[1] < SPIN_LIMIT)
  def body(c):
    return plgpu.atomic_add(ctr_ref, i, jnp.int32(0)), c[1] + 1
  lax.while_loop(cond, body, (arrived, jnp.int32(0)))
  plgpu.debug_barrier()


def _kernel(attn_ref, x_ref, wo_ref, nw_ref, wgu_ref, wd_ref, ctr_in_ref,
            x1_ref, a_ref, y_ref, ctr_ref, *, phases, layer, D, F, eps, num_programs,
            prefetch=True, layout='nk'):
  del ctr_in_ref  # aliased to ctr_ref
  p = pl.program_id(0)
  if phases in ((), ('barriers',)):  # the kernel's frame alone: its start, and its two waits
    if phases:
      _barrier(ctr_ref, 2 * layer, num_programs)
      _barrier(ctr_ref, 2 * layer + 1, num_programs)
    plgpu.store(y_ref.at[pl.ds(0, ROWS), pl.ds(0, BLOCK)],
                plgpu.load(x_ref.at[pl.ds(0, ROWS), pl.ds(0, BLOCK)]),
                mask=jnp.full((ROWS, BLOCK), p == 0))
    return
  bf = x_ref.dtype
  nd, nf = D // BLOCK, F // BLOCK
  pd = jnp.minimum(p, nd - 1) * BLOCK   # a column block of D (programs past nd repeat the last)
  pf = jnp.minimum(p, nf - 1) * BLOCK
  def store(ref, c0, val, n):
    plgpu.store(ref.at[pl.ds(0, ROWS), pl.ds(c0, BLOCK)], val.astype(bf),
                mask=jnp.full(val.shape, p < n))
  wait = functools.partial(_barrier, ctr_ref, num_programs=num_programs)
  if 0 in phases:
    wo = _load_weight(wo_ref, pd, D, layout)
    o = _dot(_load_tile(attn_ref, 0, D), wo, layout).astype(bf)
    xt = plgpu.load(x_ref.at[pl.ds(0, ROWS), pl.ds(pd, BLOCK)])
    store(x1_ref, pd, xt.astype(jnp.float32) + o.astype(jnp.float32), nd)
  if 1 in phases:
    if prefetch:
      wg, wu = _load_weight(wgu_ref, pf, D, layout), _load_weight(wgu_ref, F + pf, D, layout)
    if 0 in phases:
      wait(2 * layer)
    if not prefetch:
      wg, wu = _load_weight(wgu_ref, pf, D, layout), _load_weight(wgu_ref, F + pf, D, layout)
    # split: the o phase's output enters as this kernel's x
    xs = _load_tile(x1_ref, 0, D, volatile=True) if 0 in phases else _load_tile(x_ref, 0, D)
    xs = [x.astype(jnp.float32) for x in xs]
    ss = sum(jnp.sum(x * x, axis=1, keepdims=True) for x in xs)
    inv = lax.rsqrt(ss / D + eps)
    hs = [(plgpu.load(nw_ref.at[pl.ds(k0, kw)]).astype(jnp.float32)[None, :]
           * (x * inv).astype(bf).astype(jnp.float32)).astype(bf)
          for x, (k0, kw) in zip(xs, _pieces(D))]
    g = _dot(hs, wg, layout).astype(bf).astype(jnp.float32)
    u = _dot(hs, wu, layout).astype(bf).astype(jnp.float32)
    store(a_ref, pf, (g * jax.nn.sigmoid(g)).astype(bf).astype(jnp.float32) * u, nf)
  if 2 in phases:
    if prefetch:
      wd = _load_weight(wd_ref, pd, F, layout)
    if 1 in phases:
      wait(2 * layer + 1)
    if not prefetch:
      wd = _load_weight(wd_ref, pd, F, layout)
    acts = _load_tile(a_ref, 0, F, volatile=1 in phases)
    down = _dot(acts, wd, layout).astype(bf)
    x1t = plgpu.load(x1_ref.at[pl.ds(0, ROWS), pl.ds(pd, BLOCK)], volatile=1 in phases)
    store(y_ref, pd, x1t.astype(jnp.float32) + down.astype(jnp.float32), nd)


def finish_pallas(w, x, attn, ctr, *, layer, eps, phases, num_warps, num_programs,
                  prefetch=True, layout='nk', carried=()):
  """The kernel over `phases`; `carried`: (x1, a) from the earlier phases' kernels, which
  phase 2 alone reads in place of its own x1 and a outputs. Returns x1, a, y and ctr."""
  T, D = x.shape
  F = w['wd'].shape[1]
  full = lambda s: pl.BlockSpec(s, lambda p: (0,) * len(s))
  if layout == 'nk':
    args = (attn, x, w['wo'], w['nw'], w['wgu'], w['wd'], ctr)
  else:
    args = (attn, x, w['wo_kn'], w['nw'], w['wgu_kn'].reshape(D, 2 * F), w['wd_kn'], ctr)
  out_shape = [jax.ShapeDtypeStruct((T, D), x.dtype), jax.ShapeDtypeStruct((T, F), x.dtype),
               jax.ShapeDtypeStruct((T, D), x.dtype), jax.ShapeDtypeStruct(ctr.shape, ctr.dtype)]
  kernel = functools.partial(_kernel, phases=phases, layer=layer, D=D, F=F, eps=eps,
                             num_programs=num_programs, prefetch=prefetch, layout=layout)
  if carried:
    def kernel(*refs, body=kernel):
      *inputs, x1_in, a_in, _, _, y_ref, ctr_ref = refs
      body(*inputs, x1_in, a_in, y_ref, ctr_ref)
  args += tuple(carried)
  return pl.pallas_call(
      kernel, grid=(num_programs,), in_specs=[full(a.shape) for a in args],
      out_specs=[full(s.shape) for s in out_shape], out_shape=out_shape,
      input_output_aliases={6: 3},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=INTERPRET, name=f'finish_{"".join(map(str, phases))}')(*args)


def chain(x, attn, ws, *, kind, eps, num_warps=4, prefetch=True, layout='nk', fresh_ctr=False):
  """x through every layer's closing half; returns the last output."""
  D, F = x.shape[1], ws[0]['wd'].shape[1]
  if kind == 'xla':
    for w in ws:
      lp = dict(wo=w['wo_kn'], mlp_norm=w['nw'], w_gate_up=w['wgu_kn'], w_down=w['wd_kn'])
      x = model._finish_layer(lp, CONFIG, x[None], lax.optimization_barrier(attn)[None])[0]
    return x
  ctr = jnp.zeros((2 * len(ws),), jnp.int32)
  n_all = max(D, F) // BLOCK
  for l, w in enumerate(ws):
    if kind in ('empty', 'barriers'):  # x only passes through: a chain of the frames
      _, _, x, ctr = finish_pallas(w, x, attn, ctr, layer=l, eps=eps,
                                   phases=() if kind == 'empty' else ('barriers',),
                                   num_warps=num_warps, num_programs=n_all)
    elif kind == 'persistent':
      # fresh_ctr: zeroed counters of its own (a memset a layer), not passed on
      counters, layer = (jnp.zeros((2,), jnp.int32), 0) if fresh_ctr else (ctr, l)
      _, _, x, counters = finish_pallas(w, x, attn, counters, layer=layer, eps=eps,
                                        phases=(0, 1, 2), num_warps=num_warps,
                                        num_programs=n_all, prefetch=prefetch, layout=layout)
      ctr = ctr if fresh_ctr else counters
    else:  # split: one kernel a phase
      x1, _, _, ctr = finish_pallas(w, x, attn, ctr, layer=l, eps=eps, phases=(0,),
                                    num_warps=num_warps, num_programs=D // BLOCK, layout=layout)
      _, a, _, ctr = finish_pallas(w, x1, attn, ctr, layer=l, eps=eps, phases=(1,),
                                   num_warps=num_warps, num_programs=F // BLOCK, layout=layout)
      _, _, x, ctr = finish_pallas(w, x1, attn, ctr, layer=l, eps=eps, phases=(2,),
                                   num_warps=num_warps, num_programs=D // BLOCK, layout=layout,
                                   carried=(x1, a))
  return x


def make_weights(config, num_layers, dtype, seed=0):
  D, F = config.hidden_size, config.intermediate_size
  rng = np.random.default_rng(seed)
  ws = []
  for _ in range(num_layers):
    wo = (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
    wg = (rng.standard_normal((D, F)) / np.sqrt(D)).astype(np.float32)
    wu = (rng.standard_normal((D, F)) / np.sqrt(D)).astype(np.float32)
    wd = (rng.standard_normal((F, D)) / np.sqrt(F)).astype(np.float32)
    nw = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    c = lambda a: jnp.asarray(a, dtype)
    ws.append(dict(
        wo=c(wo.T), wgu=c(np.concatenate([wg.T, wu.T])), wd=c(wd.T), nw=c(nw),   # [N, K]
        wo_kn=c(wo), wgu_kn=c(np.concatenate([wg, wu], 1)[:, None, :]), wd_kn=c(wd)))
  return ws


PRESET = os.environ.get('PRESET', 'smollm2-135m')
CONFIG = models.PRESETS[PRESET]()

if __name__ == '__main__':
  out_dir = os.environ.get('OUT', '.')
  num_layers = int(os.environ.get('LAYERS', CONFIG.num_layers))
  reps, turns = int(os.environ.get('REPS', 50)), int(os.environ.get('TURNS', 5))
  ws = make_weights(CONFIG, num_layers, jnp.bfloat16)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((ROWS, CONFIG.hidden_size)), jnp.bfloat16)
  attn = jnp.asarray(rng.standard_normal((ROWS, CONFIG.hidden_size)), jnp.bfloat16)
  eps = CONFIG.rms_norm_eps
  kinds = {'xla': dict(kind='xla'), 'split': dict(kind='split'),
           'split_kn': dict(kind='split', layout='kn'),
           'persistent_w4': dict(kind='persistent', num_warps=4),
           'persistent_w8': dict(kind='persistent', num_warps=8),
           'persistent_w4_noprefetch': dict(kind='persistent', num_warps=4, prefetch=False),
           'persistent_w4_kn': dict(kind='persistent', num_warps=4, layout='kn'),
           'persistent_w8_kn': dict(kind='persistent', num_warps=8, layout='kn'),
           'persistent_w4_fresh_ctr': dict(kind='persistent', num_warps=4, fresh_ctr=True)}
  if INTERPRET:
    kinds = {k: v for k, v in kinds.items() if v['kind'] != 'persistent'}
  fns = {k: functools.partial(jax.jit(functools.partial(chain, eps=eps, **v)), ws=ws)
         for k, v in kinds.items()}
  outs = {k: np.asarray(f(x, attn).astype(jnp.float32)) for k, f in fns.items()}
  ref = outs['xla']
  report = dict(preset=PRESET, layers=num_layers, rows=ROWS, jax=jax.__version__,
                device=str(jax.devices()[0].device_kind), checks={}, us_per_layer={})
  for k, o in outs.items():
    report['checks'][k] = dict(max_abs_vs_xla=float(np.max(np.abs(o - ref))),
                               max_abs_xla=float(np.max(np.abs(ref))),
                               bit_equal_split=bool(np.array_equal(o, outs['split'])),
                               bit_equal_split_kn=bool(np.array_equal(o, outs['split_kn'])))
  print(json.dumps(report['checks'], indent=1), flush=True)
  times = {k: [] for k in fns}
  for t in range(turns):
    for k, f in fns.items():
      f(x, attn).block_until_ready()
      t0 = time.perf_counter()
      for _ in range(reps):
        y = f(x, attn)
      y.block_until_ready()
      times[k].append((time.perf_counter() - t0) / reps / num_layers * 1e6)
  for k, v in times.items():
    report['us_per_layer'][k] = dict(median=float(np.median(v)), all=v)
    print(f'{k:16s} {np.median(v):7.2f} us/layer  {["%.2f" % a for a in v]}', flush=True)
  json.dump(report, open(os.path.join(out_dir, f'persistent_finish_{PRESET}.json'), 'w'), indent=1)
