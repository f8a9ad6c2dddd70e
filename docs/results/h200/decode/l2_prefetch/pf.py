"""Scratch (not part of the library): `attention_pallas`'s split kernel, its programs also
loading a share of some weights into the GPU's L2 cache (the values unused; a never-taken
store keeps the loads). `install()` patches `model.decoder_layer` and
`attention_pallas.cache_attention_pallas` so that each packed, rider-free attention call
traced afterwards prefetches `PICK(lp)`, the weights of the layer being traced (PICK None: the
library's kernel); `MODE` 'after' or 'before' the program's attention work. As run at commit
927472f."""
import functools
import jax, jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from clasp_jax import attention_pallas as ap, model as model_lib

COLS = 512
TILE_R = 8
MODE = 'after'
POLICY = 'evict_last'


def _prefetch(w_ref, dummy_ref, i, n):
  R, C = w_ref.shape
  per = -(-R // n)
  per = -(-per // TILE_R) * TILE_R
  r0 = i * per
  assert C == COLS
  steps = per // TILE_R
  def body(j, acc):
    rr = r0 + j * TILE_R + jnp.arange(TILE_R)
    cc = jnp.arange(COLS)
    ok = (rr < R)[:, None]
    t = plgpu.load(w_ref.at[jnp.where(rr < R, rr, 0)[:, None], cc[None, :]],
                   mask=jnp.broadcast_to(ok, (TILE_R, COLS)), other=0, eviction_policy=POLICY)
    return jnp.maximum(acc, jnp.max(t.astype(jnp.float32)))
  acc = lax.fori_loop(0, steps, body, jnp.float32(-jnp.inf))
  @pl.when(acc == -12345.5)
  def _():
    dummy_ref[...] = acc


def _kernel(start_ref, layer_ref, q, k, v, ck, cv, *refs, num_w, KV, nrb, P, **kw):
  ws = refs[:num_w]
  m, l, o, dummy = refs[num_w:]
  kv, r, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  i, n = (kv * nrb + r) * P + p, KV * nrb * P
  if MODE == 'before':
    for w in ws:
      _prefetch(w, dummy, i, n)
  ap._split_kernel(start_ref, layer_ref, q, k, v, ck, cv, m, l, o, **kw)
  if MODE == 'after':
    for w in ws:
      _prefetch(w, dummy, i, n)


def split_stats_pf(qkv, ck, cv, layer, start, weights):
  L, _, S, KV, hd = ck.shape
  T = qkv.shape[1]
  H = qkv.shape[3] - 2 * KV
  G = H // KV
  split = ap.split_size(KV)
  rows = min(ap.MAX_ROW_BLOCK, max(16, pl.next_power_of_2(T * G)))
  nrb = pl.cdiv(T * G, rows)
  P = pl.cdiv(S, split)
  X = nrb * rows
  q = qkv[0].reshape(T * (H + 2 * KV), hd)
  ws = [w.reshape(-1, COLS) for w in weights]
  scalars = (ap._int32(start), ap._int32(layer))
  sspec = pl.BlockSpec((), lambda k, r, p: ())
  whole = lambda x: pl.BlockSpec(x.shape, lambda k, r, p: (0,) * x.ndim)
  cspec = pl.BlockSpec((L, None, S, KV, hd), lambda k, r, p: (0, 0, 0, 0, 0))
  stat = pl.BlockSpec((None, None, rows), lambda k, r, p: (p, k, r))
  return pl.pallas_call(
      functools.partial(_kernel, num_w=len(ws), KV=KV, nrb=nrb, P=P, num_tokens=T, group=G,
                        own_keys=True, first_rider=T, split=split,
                        stride=(H + 2 * KV,) * 2, kv_offsets=(H, H + KV)),
      grid=(KV, nrb, P),
      in_specs=[sspec, sspec, whole(q), whole(q), whole(q), cspec, cspec] + [whole(w) for w in ws],
      out_specs=[stat, stat, pl.BlockSpec((None, None, rows, hd), lambda k, r, p: (p, k, r, 0)),
                 pl.BlockSpec((None, None, None), lambda k, r, p: (k, r, p))],
      out_shape=[jax.ShapeDtypeStruct((P, KV, X), jnp.float32)] * 2
                + [jax.ShapeDtypeStruct((P, KV, X, hd), jnp.float32),
                   jax.ShapeDtypeStruct((KV, nrb, P), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=ap.NUM_WARPS, num_stages=ap.NUM_STAGES),
      interpret=jax.default_backend() != 'gpu', name='cache_attention')(
          *scalars, q, q, q, ck, cv, *ws)


_CURRENT = []
_orig_layer = model_lib.decoder_layer
_orig_attn = ap.cache_attention_pallas
PICK = None  # lp -> list of weights to prefetch; None: no prefetch


def _layer(lp, *args, **kw):
  _CURRENT.append(lp)
  try:
    return _orig_layer(lp, *args, **kw)
  finally:
    _CURRENT.pop()


def _attention(q, k, v, ck, cv, layer, start, riders=None, *, interpret=False):
  ws = PICK(_CURRENT[-1]) if (PICK and _CURRENT and k is None and riders is None) else None
  if not ws:
    return _orig_attn(q, k, v, ck, cv, layer, start, riders, interpret=interpret)
  T = q.shape[1]
  H = q.shape[3] - 2 * ck.shape[3]
  m, l, o, _ = split_stats_pf(q, ck, cv, layer, start, ws)
  return ap.fold(m, l, o, start + T, num_tokens=T, num_heads=H, dtype=q.dtype,
                 interpret=interpret)


def install():
  model_lib.decoder_layer = _layer
  ap.cache_attention_pallas = _attention
