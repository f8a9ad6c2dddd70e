"""A functional LLaMA decoder over a stacked params pytree.

Params (every matrix stored (in, out) so the model computes `x @ W`; layer weights stacked
on a leading axis L):

  embed [V, D]; final_norm [D]; lm_head [D, V] (absent when embeddings are tied);
  layers: attn_norm [L, D], wq [L, D, H*hd], wk/wv [L, D, KV*hd], wo [L, H*hd, D],
          optional bq [L, H*hd], bk/bv [L, KV*hd], mlp_norm [L, D],
          w_gate/w_up [L, D, F], w_down [L, F, D].

The accelerator layout (`unstack_layers`) holds a tuple of L per-layer trees instead, with
gate/up (and q/k/v) fused per tensor-parallel shard: w_gate_up [D, n, 2F/n], w_qkv
[D, n, (H+2KV)/n*hd] (see `fuse_projections`; n = 1 on one device).

`forward` runs a chunk of T tokens at positions [cache.length, cache.length + T), writes their
keys/values and advances the cache. The layers are applied with `lax.scan` over the stacked
tree (the reference path), or over per-layer trees (`unstack_layers`): a `lax.scan` whose
products pick the layer's own buffer on a CPU, unrolled on accelerators (`scan_layers`); a
bool[L] `skip` vector turns layers into identities (one `lax.cond` per layer, reference path),
and `layer_ids_A` runs only some layers' own trees (the per-layer draft). Attention over the
cache is `attention.cache_attention`, whose reduction order does not depend on the pass a
token sits in. `pseudo_token_layer` runs one layer on M independent pseudo-tokens sharing one
position, for the CLaSp dynamic programme; a `Ride` carries such pseudo-tokens through a pass's
padding rows instead, so one reading of the weights serves both. Every product goes through
`cpu_product.product`: XLA's, or on a CPU the kernel for passes of 1 to 3 rows.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax import attention as attention_lib
from clasp_jax import cpu_product
from clasp_jax import widths
from clasp_jax import xla_options
from clasp_jax.cache import KVCache
from clasp_jax.config import LlamaConfig

Params = dict[str, Any]
#: (q_BTHh, k_BTKh, v_BTKh) -> attention output [B, T, H*hd], for one layer and chunk; with
#: k and v None, q holds q, k and v packed (`attention.split_packed`).
Attend = Callable[[jax.Array, jax.Array | None, jax.Array | None], jax.Array]
#: The cache attention: `attention.cache_attention`'s signature.
Attention = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class ForwardOutput:
  """What `forward` returns.

  Attributes:
    logits_BPV: float32 logits at the requested chunk positions.
    cache: the cache with the chunk written and `length` advanced by T.
    hiddens_LBPD: [L+1, B, P, D] pre-final-norm hidden states (embedding output, then each
      layer's output) at the requested positions.
    ride_ys: what a `Ride`'s `after` returned at every layer, stacked on a leading L axis
      (None without a ride).
  """

  logits_BPV: jax.Array
  cache: KVCache
  hiddens_LBPD: jax.Array
  ride_ys: Any = None


jax.tree_util.register_dataclass(
    ForwardOutput, data_fields=['logits_BPV', 'cache', 'hiddens_LBPD', 'ride_ys'],
    meta_fields=[])


@dataclasses.dataclass(frozen=True)
class Ride:
  """Pseudo-tokens that ride along a full-model pass in rows past its real tokens, so that
  one reading of each weight serves both (the CLaSp DP inside a verify pass).

  The F riders all sit at position `pos` and, as in `pseudo_token_layer`, each attends to the
  cached keys below `pos` and to its own key only, in the pass's own attention
  (`attention.Riders`). Between layers `after` gives the next layer's input: the layer's
  output with the riders' rows replaced (the DP keeps, per candidate, the better of running
  the layer and skipping it). The chunk's real rows come before the riders and attention
  within a chunk is causal, so the real rows never see them and compute bit for bit what they
  compute without riders; the riders' keys and values land in the cache past the real rows,
  where padding rows' land.

  Attributes:
    first_row: the chunk row of the first rider (static); rows [first_row, first_row + F).
    pos: int32 scalar, the riders' position (at most the chunk's start).
    init_FD: the riders' states entering the first layer.
    after: (layer index a, the riders' rows, layer a's input x_BTD, its output x_BTD) ->
      (layer a + 1's input x_BTD: the output with the riders' rows replaced, y), the real
      rows left as they are; `ForwardOutput.ride_ys` stacks the y's.
  """

  first_row: int
  pos: jax.Array
  init_FD: jax.Array
  after: Callable[[Any, slice, jax.Array, jax.Array], tuple[jax.Array, Any]]

  @property
  def rows(self) -> slice:
    return slice(self.first_row, self.first_row + self.init_FD.shape[0])


def replace_rows(x_BTD: jax.Array, rows: slice, rows_FD: jax.Array) -> jax.Array:
  """x with chunk rows `rows` (batch 1) replaced by rows_FD: a new array, not an update of
  x, which a pass still holds (its hidden states), so XLA need not copy it first."""
  return jnp.concatenate([x_BTD[:, :rows.start], rows_FD[None].astype(x_BTD.dtype),
                          x_BTD[:, rows.stop:]], axis=1)


def rms_norm(x_XD: jax.Array, w_D: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in float32, returned in the input's dtype (as HF LLaMA does)."""
  x32_XD = x_XD.astype(jnp.float32)
  x32_XD = x32_XD * jax.lax.rsqrt(jnp.mean(x32_XD * x32_XD, axis=-1, keepdims=True) + eps)
  return w_D * x32_XD.astype(x_XD.dtype)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Per-pair inverse frequencies [head_dim / 2], with LLaMA-3 scaling when configured."""
  hd = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
  rs = config.rope_scaling
  if rs is None:
    return inv_freq
  old_ctx = rs.original_max_position_embeddings
  low_wavelen = old_ctx / rs.low_freq_factor
  high_wavelen = old_ctx / rs.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
  smooth = (old_ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
  is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(config: LlamaConfig, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables [B, T, head_dim] in float32 for the given positions."""
  freqs_BTd = positions_BT.astype(jnp.float32)[..., None] * rope_inv_freq(config)
  emb_BTh = jnp.concatenate([freqs_BTd, freqs_BTd], axis=-1)
  return jnp.cos(emb_BTh), jnp.sin(emb_BTh)


def _apply_rope(x_BT_h: jax.Array, cos_BTh: jax.Array, sin_BTh: jax.Array,
                roped_N: jax.Array | None = None) -> jax.Array:
  """Rotates q or k heads (HF's rotate_half convention), in float32; `x_BT_h` is [B, T, ...,
  hd]. With `roped_N` (bool over the second-to-last axis), only those heads, the others
  passed through as they are (the values of a packed q/k/v)."""
  x32_BT_h = x_BT_h.astype(jnp.float32)
  x1, x2 = jnp.split(x32_BT_h, 2, axis=-1)
  rotated_BT_h = jnp.concatenate([-x2, x1], axis=-1)
  heads = (slice(None), slice(None)) + (None,) * (x_BT_h.ndim - 3)  # cos/sin over the heads
  out_BT_h = x32_BT_h * cos_BTh[heads] + rotated_BT_h * sin_BTh[heads]
  if roped_N is not None:
    out_BT_h = jnp.where(roped_N[:, None], out_BT_h, x32_BT_h)
  return out_BT_h.astype(x_BT_h.dtype)


#: The per-layer weights that are multiplied (rather than added or scaled): in a layer loop over
#: per-layer buffers (`scan_layers` on a CPU) each is a `LayerChoice`.
_PRODUCT_WEIGHTS = frozenset({'wq', 'wk', 'wv', 'w_qkv', 'wo', 'w_gate', 'w_up', 'w_gate_up',
                              'w_down'})


@dataclasses.dataclass(frozen=True)
class LayerChoice:
  """One weight of every layer, the layer picked by a traced index: what a layer loop over
  per-layer buffers hands a layer (`scan_layers`), multiplied in place by `_product`.

  Attributes:
    index: int32 scalar, the layer.
    weights: the weight of each layer, its own buffer.
  """

  index: jax.Array
  weights: tuple[jax.Array, ...]


def _product(form: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
             w: jax.Array | LayerChoice) -> jax.Array:
  """`form(x, w)`, a product of x by a weight; for a `LayerChoice`, by the chosen layer's own
  buffer: a `lax.switch` with one branch per layer, each a product of its own buffer read where
  it lies. (A traced index into a stacked weight copies the layer's slice before the product:
  on a CPU that costs more than a narrow product itself.)"""
  if not isinstance(w, LayerChoice):
    return form(x, w)
  return jax.lax.switch(w.index, [lambda x, w=w_l: form(x, w) for w_l in w.weights], x)


def _qkv(lp: Params, config: LlamaConfig, x_BTD: jax.Array, cos_BTh: jax.Array,
         sin_BTh: jax.Array) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
  """Pre-attention norm and projections, q and k roped, as an attention's first three
  arguments: packed [B, T, n, H/n + 2 KV/n, hd], None, None when q/k/v are fused
  (`fuse_projections`; see `attention.split_packed`), else q [B, T, H, hd], k and v [B, T,
  KV, hd]."""
  B, T, _ = x_BTD.shape
  hd = config.head_dim
  h_BTD = rms_norm(x_BTD, lp['attn_norm'], config.rms_norm_eps)
  if 'w_qkv' in lp:  # fused per shard: one product, one kernel for q, k and v after it
    qkv_BTnY = _product(_fused_matmul, h_BTD, lp['w_qkv'])
    if config.attention_bias:
      qkv_BTnY = qkv_BTnY + lp['b_qkv']
    n = qkv_BTnY.shape[2]
    qkv_BTnNh = qkv_BTnY.reshape(B, T, n, -1, hd)
    roped_N = jnp.arange(qkv_BTnNh.shape[3]) < (config.num_heads + config.num_kv_heads) // n
    return _apply_rope(qkv_BTnNh, cos_BTh, sin_BTh, roped_N), None, None
  q_BTq, k_BTk, v_BTk = (_product(cpu_product.product, h_BTD, lp[w]) for w in ('wq', 'wk', 'wv'))
  if config.attention_bias:
    q_BTq, k_BTk, v_BTk = q_BTq + lp['bq'], k_BTk + lp['bk'], v_BTk + lp['bv']
  q_BTHh = q_BTq.reshape(B, T, config.num_heads, hd)
  k_BTKh = k_BTk.reshape(B, T, config.num_kv_heads, hd)
  v_BTKh = v_BTk.reshape(B, T, config.num_kv_heads, hd)
  return (_apply_rope(q_BTHh, cos_BTh, sin_BTh), _apply_rope(k_BTKh, cos_BTh, sin_BTh),
          v_BTKh)


def _closing_product(x_BTK: jax.Array, w_KD: jax.Array) -> jax.Array:
  """`x @ W` for the products that close a sub-layer (o and down), back to the residual
  stream's width D.

  `cpu_product.product`, but for a 1-row chunk on a CPU without the kernel (bfloat16, or the
  kernel off or missing): two products over the halves of K, summed in float32. XLA's CPU
  compiler splits a 1-row product's work by its weight's bytes, about one thread per 1.8 MB,
  so SmolLM2-135M's o product (1.3 MB) ran on one of two cores; the two halves run side by
  side. On a 2-core Xeon the o product ran 1.6x and down about 1.1x faster, and a token of
  plain decoding at width 1 1.04-1.07x (docs/results/cpu/row_products/). (The kernel shares
  its columns among the threads whatever the weight's size.) Every pass of a decoder at width
  1 has one row, so all of them take the same form.
  """
  B, T, K = x_BTK.shape
  if (xla_options.platform() != 'cpu' or B * T != 1 or K % 2
      or cpu_product.applies(x_BTK, w_KD)):
    return cpu_product.product(x_BTK, w_KD)
  x_2k = x_BTK.reshape(2, K // 2)
  w_2kD = w_KD.reshape(2, K // 2, w_KD.shape[1])  # the halves of K, as the weight lies
  halves_2D = jnp.einsum('sk,skd->sd', x_2k, w_2kD, preferred_element_type=jnp.float32)
  return (halves_2D[0] + halves_2D[1]).astype(x_BTK.dtype).reshape(B, T, -1)


def _finish_layer(lp: Params, config: LlamaConfig, x_BTD: jax.Array,
                  attn_BTq: jax.Array) -> jax.Array:
  """Output projection, residual, and the SwiGLU MLP with its residual."""
  x_BTD = x_BTD + _product(_closing_product, attn_BTq, lp['wo'])
  h_BTD = rms_norm(x_BTD, lp['mlp_norm'], config.rms_norm_eps)
  if 'w_gate_up' in lp:  # fused per shard (see `fuse_projections`)
    gate_BTnF, up_BTnF = jnp.split(_product(_fused_matmul, h_BTD, lp['w_gate_up']), 2, axis=-1)
    act_BTF = (jax.nn.silu(gate_BTnF) * up_BTnF).reshape(x_BTD.shape[:-1] + (-1,))
  else:
    act_BTF = (jax.nn.silu(_product(cpu_product.product, h_BTD, lp['w_gate']))
               * _product(cpu_product.product, h_BTD, lp['w_up']))
  return x_BTD + _product(_closing_product, act_BTF, lp['w_down'])


def decoder_layer(lp: Params, config: LlamaConfig, x_BTD: jax.Array, cos_BTh: jax.Array,
                  sin_BTh: jax.Array, attend: Attend) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One decoder layer on a chunk of T tokens.

  Args:
    lp: this layer's params (no leading L axis).
    config: the model config.
    x_BTD: the residual stream entering the layer.
    cos_BTh: RoPE cos table of the chunk's positions.
    sin_BTh: RoPE sin table of the chunk's positions.
    attend: (q_BTHh, k_BTKh, v_BTKh) -> attention output [B, T, H*hd]: what the chunk's
      queries see besides their own keys is the caller's (the cache, or a prefix of it).
      With fused q/k/v it is handed them packed (k and v None, see `Attend`).

  Returns:
    The layer output [B, T, D] and the chunk's roped keys and values [B, T, KV, hd].
  """
  # One computation of the keys and values for the attention and for the cache write. Left
  # to itself XLA may fuse them into both consumers, each fusion summing a split-K product's
  # partials and roping on its own (seen on an H200 at the LLaMA-3-8B shape), so that now and
  # then the keys a pass attends to differ in a bit from those it caches, and a later pass
  # reading them computes another token than a verified draft's: exactness lost. Packed,
  # q, k and v come out of that one computation together (one kernel on a GPU, where three
  # read the product's partial sums unpacked: docs/results/h200/decode/packed_qkv/).
  q_BTHh, k_BTKh, v_BTKh = _qkv(lp, config, x_BTD, cos_BTh, sin_BTh)
  if k_BTKh is None:  # packed
    q_BTHh = jax.lax.optimization_barrier(q_BTHh)
    attend_args = (q_BTHh, None, None)
    _, k_BTKh, v_BTKh = attention_lib.split_packed(q_BTHh, config.num_kv_heads)
  else:
    k_BTKh, v_BTKh = jax.lax.optimization_barrier((k_BTKh, v_BTKh))
    attend_args = (q_BTHh, k_BTKh, v_BTKh)
  # Likewise the output projection's input comes through a barrier, so that its kernel is
  # the same whatever produced the attention output (a pass with riders, `Ride`, runs the
  # attention with them): a product fused with another producer may be tuned to another
  # split of its sum, which would round the real rows differently.
  attn_BTq = jax.lax.optimization_barrier(attend(*attend_args))
  return _finish_layer(lp, config, x_BTD, attn_BTq), k_BTKh, v_BTKh


def pseudo_token_layer(lp: Params, config: LlamaConfig, x_MD: jax.Array, pos: jax.Array,
                       cache: KVCache, layer: jax.Array | int,
                       attention: Attention = attention_lib.prefix_attention) -> jax.Array:
  """One layer on M independent pseudo-tokens that all sit at position `pos`.

  Each pseudo-token attends to the cached prefix [0, pos) and to itself only, never to the
  other pseudo-tokens nor to the cached row at `pos`; nothing is written to the cache. This
  is how the CLaSp DP pushes all its candidate states through a layer in one call.

  Args:
    lp: this layer's params.
    config: the model config.
    x_MD: the M candidate hidden states.
    pos: int32 scalar, the target token's position.
    cache: the KV cache (batch row 0 is read).
    layer: the layer's index in the cache.
    attention: the prefix attention (`attention.prefix_attention` or a kernel with its
      signature).

  Returns:
    The M layer outputs [M, D].
  """
  M = x_MD.shape[0]
  cos_1Mh, sin_1Mh = rope_tables(config, jnp.full((1, M), pos, jnp.int32))

  def attend(q_1MHh, k_1MKh, v_1MKh):
    return attention(q_1MHh, k_1MKh, v_1MKh, cache.k_LBSKh, cache.v_LBSKh, layer, pos)

  out_1MD, _, _ = decoder_layer(lp, config, x_MD[None], cos_1Mh, sin_1Mh, attend)
  return out_1MD[0]


def is_per_layer(params: Params) -> bool:
  """Whether `params['layers']` is a tuple of per-layer trees rather than one stacked tree."""
  return isinstance(params['layers'], (tuple, list))


def num_layers_in(params: Params) -> int:
  """How many layers `params['layers']` holds."""
  layers = params['layers']
  return len(layers) if is_per_layer(params) else jax.tree.leaves(layers)[0].shape[0]


def layer_params(params: Params, i: int | jax.Array) -> Params:
  """The params of layer i (no leading L axis); i must be static for per-layer params."""
  if is_per_layer(params):
    return params['layers'][i]
  return jax.tree.map(lambda w: w[i], params['layers'])


def _fused_matmul(h_BTD: jax.Array, w_DnY: jax.Array) -> jax.Array:
  """`h @ W` for a fused weight [D, n, Y] of n shards: one matrix product, [B, T, n, Y]."""
  D, n, _ = w_DnY.shape
  return cpu_product.product(h_BTD, w_DnY.reshape(D, -1)).reshape(h_BTD.shape[:-1] + (n, -1))


def fuse_projections(lp: Params, num_shards: int = 1, fuse_qkv: bool = True) -> Params:
  """One layer's params with gate/up, and q/k/v (and their biases), side by side: a batch-1
  decode step then runs two matrix-vector products where it ran five, fewer and larger
  kernels.

  The fused weights are laid out per tensor-parallel shard, so that sharding their shard
  axis gives each device its own heads' q, k and v and its own slice of gate and up:
  `w_qkv` [D, n, (H + 2 KV) / n * hd] holds in row i the columns [q_i k_i v_i] (the i-th
  n-th of wq's, wk's and wv's columns), `b_qkv` [n, (H + 2 KV) / n * hd] likewise, and
  `w_gate_up` [D, n, 2 F / n] holds [gate_i up_i]. With n = 1 that is plain concatenation,
  and `_qkv` and `_finish_layer` compute exactly what the separate weights compute.

  Args:
    lp: one layer's params (unfused).
    num_shards: n, the tensor-parallel size; H, KV (when `fuse_qkv`) and F must divide by it.
    fuse_qkv: fuse q/k/v too; False keeps wq, wk and wv apart (for KV heads that a mesh
      replicates: `sharding.fuse_qkv`).
  """
  def per_shard(*ws):
    return jnp.concatenate([w.reshape(w.shape[:-1] + (num_shards, -1)) for w in ws], axis=-1)

  fused = {k: w for k, w in lp.items() if k not in ('w_gate', 'w_up')}
  fused['w_gate_up'] = per_shard(lp['w_gate'], lp['w_up'])
  if fuse_qkv:
    for k in ('wq', 'wk', 'wv', 'bq', 'bk', 'bv'):
      fused.pop(k, None)
    fused['w_qkv'] = per_shard(lp['wq'], lp['wk'], lp['wv'])
    if 'bq' in lp:
      fused['b_qkv'] = per_shard(lp['bq'], lp['bk'], lp['bv'])
  return fused


#: The widest pass that runs on per-layer buffers on a CPU by default. A plain step on a 2-vCPU
#: Xeon (SmolLM2-135M's shape, per-layer over stacked time, the layer loop of `scan_layers`):
#: 0.70 at width 1, 0.81 at 2, 0.80 at 3, 0.95 at 5, 0.99 at 7, 1.18 at 9
#: (docs/results/cpu/pass_width/plain_steps_loop.txt; another Xeon: 0.73 to 0.84 up to 5, 0.99
#: at 7, 0.95 at 9); the default method at width 3 with K = 2 ran 1.15x faster per layer
#: (width_k2.txt). Both layouts compile alike since the loop.
CPU_PER_LAYER_MAX_WIDTH = 5


def per_layer_by_default(pass_width: int | None = None) -> bool:
  """Whether the per-layer layout (`unstack_layers`) is the default for passes `pass_width`
  rows wide (None: the platform's default width): on GPUs and TPUs, where it pays; on a CPU
  for passes of up to `CPU_PER_LAYER_MAX_WIDTH` rows.

  A CPU reads a narrow product's weights at memory speed, so the stacked layout's per-step
  copy of each layer's weights costs more than the product itself (plain decoding of
  SmolLM2-135M at width 1: 1.40x faster per layer on a 2-core Xeon,
  docs/results/cpu/width_1_per_layer/). A wider pass computes, rather than waits for memory,
  and there the stacked layout, whose products read the copies from the caches, is faster
  (docs/results/cpu/per_layer_products/).
  """
  if jax.default_backend() != 'cpu':
    return True
  if pass_width is None:
    pass_width = widths.default_pass_width()
  return pass_width <= CPU_PER_LAYER_MAX_WIDTH


def unstack_layers(params: Params, num_shards: int = 1, fuse_qkv: bool = True) -> Params:
  """Params whose layers are a tuple of L separate trees, projections fused.

  A layer loop over one stacked tree slices (copies) each layer's weights every step, about
  twice the bytes of the step itself; separate buffers per layer are read in place
  (`scan_layers`). Done once, when a decoder is built (or the weights are loaded).
  `num_shards` and `fuse_qkv` as in `fuse_projections`.
  """
  if is_per_layer(params):
    return params
  layers = (layer_params(params, i) for i in range(num_layers_in(params)))
  return dict(params, layers=tuple(fuse_projections(lp, num_shards, fuse_qkv) for lp in layers))


def active_layers(params: Params, skip_L) -> tuple[tuple[Params, ...], np.ndarray]:
  """The draft's layers: the active layers' own per-layer trees in order, and their indices
  int32[A].

  Picked on the host whenever the skip set changes: nothing is copied, and every skip set of
  the same size has the same shapes, so the draft compiles once per M.
  """
  ids_A = np.flatnonzero(~np.asarray(skip_L)).astype(np.int32)
  return tuple(params['layers'][i] for i in ids_A), ids_A


def loops_over_layers() -> bool:
  """Whether per-layer buffers run as a layer loop on the device (on a CPU) rather than
  unrolled (on accelerators, which fuse and schedule across an unrolled program's layers and
  pay for every conditional; see `scan_layers`)."""
  return xla_options.platform() == 'cpu'


def scan_layers(params: Params, fn, carry):
  """`carry, y_a = fn(a, layer_a_params, carry)` for every layer a of `params['layers']` in
  order; returns the last carry and the y's stacked on a leading axis.

  Three programs, one computation:
  - a stacked tree: a `lax.scan` over it (the compact reference path; a is traced, and each
    layer's weights are sliced out, a copy, every step);
  - per-layer trees on a CPU (`loops_over_layers`): a `lax.scan` over the layer index whose
    layer multiplies each of its weights as a `LayerChoice` (`_product`), read in place. It
    runs as fast as the unrolled program did there and compiles one layer, not L: on a
    2-vCPU Xeon, SmolLM2-135M's plain step took 0.70 of the stacked layout's time at width 1
    and 0.80 at 3, as unrolled (0.70, 0.81), compiling in 2.5-2.9 s instead of 10.5-13.3,
    and a `clasp-generate` run at width 3 compiled in 14.8 s instead of 52.4, decoding as
    fast (docs/results/cpu/pass_width/);
  - per-layer trees elsewhere: a Python loop (unrolled; a is a Python int), the accelerator
    path.
  """
  layers = params['layers']
  if not is_per_layer(params):
    return jax.lax.scan(lambda c, xs: fn(xs[1], xs[0], c), carry,
                        (layers, jnp.arange(num_layers_in(params))))
  if loops_over_layers():
    per_layer = {k: tuple(lp[k] for lp in layers) for k in layers[0]}
    # Norms and biases are small: stacked once and sliced per layer.
    vectors_L = {k: jnp.stack(ws) for k, ws in per_layer.items() if k not in _PRODUCT_WEIGHTS}

    def step(c, a):
      lp = {k: vectors_L[k][a] if k in vectors_L else LayerChoice(a, ws)
            for k, ws in per_layer.items()}
      return fn(a, lp, c)

    return jax.lax.scan(step, carry, jnp.arange(len(layers)))
  ys = []
  for a, lp in enumerate(layers):
    carry, y = fn(a, lp, carry)
    ys.append(y)
  return carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)


def lm_head(params: Params, config: LlamaConfig, x_XD: jax.Array) -> jax.Array:
  """Final norm and output projection; float32 logits [..., V]."""
  h_XD = rms_norm(x_XD, params['final_norm'], config.rms_norm_eps)
  w_DV = params['embed'].T if config.tie_embeddings else params['lm_head']
  return jnp.einsum('...d,dv->...v', h_XD, w_DV, preferred_element_type=jnp.float32)


def forward(params: Params, config: LlamaConfig, tokens_BT: jax.Array, cache: KVCache, *,
            skip_L: jax.Array | None = None, layer_ids_A: jax.Array | None = None,
            out_idx_BP: jax.Array | None = None,
            attention: Attention = attention_lib.cache_attention,
            ride: Ride | None = None, num_rows: int | None = None) -> ForwardOutput:
  """Runs a chunk of T tokens through the model, reading and writing the cache.

  The chunk sits at positions [cache.length, cache.length + T). Inside the layer loop the
  cache is only read (each layer attends to its cached rows below the chunk and to the
  chunk's own keys, see `attention.cache_attention`); every layer's new rows are written
  after it, so the loop never copies the cache.

  Args:
    params: the params pytree; its layers stacked (reference) or per layer (accelerators,
      see `unstack_layers`).
    config: the model config.
    tokens_BT: int32 token ids.
    cache: the KV cache; it must have room for T more rows.
    skip_L: optional bool[L]; True layers act as identities and leave the cache untouched
      (reference path: one `lax.cond` per layer).
    layer_ids_A: optional int32[A]: `params['layers']` then holds only these A layers, in
      this order (the accelerator draft path, see `active_layers`: a draft step reads only
      the layers it runs).
    out_idx_BP: optional int32 chunk indices at which to return logits and hidden states;
      None means every position (P = T).
    attention: the cache attention (`attention.cache_attention` or a kernel with its
      signature and numerics contract).
    ride: optional pseudo-tokens carried in rows past the real tokens (see `Ride`); B = 1,
      every layer run (no `skip_L`, no `layer_ids_A`).
    num_rows: optional, the chunk's real tokens where the rest pad it (no ride): the
      attention may skip the padding rows (`attention.cache_attention`), whose outputs then
      hold nothing meaningful.

  Returns:
    A `ForwardOutput`; its hidden states are [A+1, B, P, D].
  """
  B, T = tokens_BT.shape
  if ride is not None and (B != 1 or skip_L is not None or layer_ids_A is not None):
    raise ValueError('a ride needs a batch of one and every layer run')
  start = cache.length
  positions_BT = start + jnp.broadcast_to(jnp.arange(T), (B, T))
  if ride is not None:
    positions_BT = positions_BT.at[:, ride.rows].set(ride.pos)
  cos_BTh, sin_BTh = rope_tables(config, positions_BT)
  riders = None if ride is None else attention_lib.Riders(ride.first_row, ride.pos)
  rows = {} if num_rows is None else {'num_rows': num_rows}
  x_BTD = params['embed'][tokens_BT]

  def select(x_BTD):
    if out_idx_BP is None:
      return x_BTD
    return jnp.take_along_axis(x_BTD, out_idx_BP[..., None], axis=1)

  def step(a, lp, carry):
    x_BTD, _ = carry
    i = a if layer_ids_A is None else layer_ids_A[a]
    # Each layer starts from a materialised input, the riders' rows written or not, so that
    # a pass with riders runs the real rows through the same kernels as one without.
    x_BTD = jax.lax.optimization_barrier(x_BTD)

    def run(x_BTD):
      def attend(q_BTHh, k_BTKh, v_BTKh):  # k and v None: q packed
        return attention(q_BTHh, k_BTKh, v_BTKh, cache.k_LBSKh, cache.v_LBSKh, i, start,
                         riders, **rows)
      return decoder_layer(lp, config, x_BTD, cos_BTh, sin_BTh, attend)

    def keep(x_BTD):  # a skipped layer leaves its cache rows as they were
      rows = (1, B, T) + cache.k_LBSKh.shape[3:]
      return (x_BTD, jax.lax.dynamic_slice(cache.k_LBSKh, (i, 0, start, 0, 0), rows)[0],
              jax.lax.dynamic_slice(cache.v_LBSKh, (i, 0, start, 0, 0), rows)[0])

    out_BTD, k_BTKh, v_BTKh = (run(x_BTD) if skip_L is None
                               else jax.lax.cond(skip_L[a], keep, run, x_BTD))
    next_BTD, ride_y = out_BTD, None
    if ride is not None:
      next_BTD, ride_y = ride.after(a, ride.rows, x_BTD, out_BTD)
    dtype = cache.k_LBSKh.dtype
    # With riders the carry also holds the layer's output as it came: the last one goes on
    # to the final norm as it does without riders.
    return ((next_BTD, None if ride is None else out_BTD),
            (select(out_BTD), k_BTKh.astype(dtype), v_BTKh.astype(dtype), ride_y))

  init = (x_BTD, None)
  if ride is not None:
    init = (replace_rows(x_BTD, ride.rows, ride.init_FD), x_BTD)
  (x_BTD, out_BTD), (hiddens_ABPD, k_ABTKh, v_ABTKh, ride_ys) = scan_layers(params, step, init)
  if ride is not None:
    x_BTD = out_BTD
  # The cache is written in place once every layer has read it: its writes take it from a
  # barrier with the last layer's output, which needs every read. Left to order them, XLA may
  # schedule a write before a read and then copy the whole cache to keep the read's version
  # (seen on an H200 at the LLaMA-3-8B shape: two cache copies a draft step, 5% of a round).
  x_BTD, k_LBSKh, v_LBSKh = jax.lax.optimization_barrier((x_BTD, cache.k_LBSKh, cache.v_LBSKh))
  if layer_ids_A is None:  # every layer's rows at once
    k_LBSKh = jax.lax.dynamic_update_slice(k_LBSKh, k_ABTKh, (0, 0, start, 0, 0))
    v_LBSKh = jax.lax.dynamic_update_slice(v_LBSKh, v_ABTKh, (0, 0, start, 0, 0))
  else:  # each active layer's rows to its own place (A static: no device loop)
    for a in range(k_ABTKh.shape[0]):
      k_LBSKh = jax.lax.dynamic_update_slice(k_LBSKh, k_ABTKh[a][None],
                                             (layer_ids_A[a], 0, start, 0, 0))
      v_LBSKh = jax.lax.dynamic_update_slice(v_LBSKh, v_ABTKh[a][None],
                                             (layer_ids_A[a], 0, start, 0, 0))
  hiddens_ABPD = jnp.concatenate([select(params['embed'][tokens_BT])[None], hiddens_ABPD])
  return ForwardOutput(logits_BPV=lm_head(params, config, select(x_BTD)),
                       cache=KVCache(k_LBSKh=k_LBSKh, v_LBSKh=v_LBSKh, length=start + T),
                       hiddens_LBPD=hiddens_ABPD, ride_ys=ride_ys)


def init_params(config: LlamaConfig, key: jax.Array, dtype: jnp.dtype = jnp.float32,
                scale: float = 0.02) -> Params:
  """Random params of the right shapes (normal(0, scale) matrices, unit norms).

  For tests and for benchmarks of a preset's shape without its weights.
  """
  L, D, F, V = (config.num_layers, config.hidden_size, config.intermediate_size,
                config.vocab_size)
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  shapes = {'wq': (L, D, q), 'wk': (L, D, kv), 'wv': (L, D, kv), 'wo': (L, q, D),
            'w_gate': (L, D, F), 'w_up': (L, D, F), 'w_down': (L, F, D)}
  if config.attention_bias:
    shapes.update(bq=(L, q), bk=(L, kv), bv=(L, kv))
  if not config.tie_embeddings:
    shapes['lm_head'] = (D, V)
  shapes['embed'] = (V, D)
  keys = dict(zip(shapes, jax.random.split(key, len(shapes))))
  rand = {name: (scale * jax.random.normal(keys[name], shape, jnp.float32)).astype(dtype)
          for name, shape in shapes.items()}
  layers = {name: rand.pop(name) for name in list(rand) if rand[name].ndim == 3
            or name in ('bq', 'bk', 'bv')}
  layers['attn_norm'] = jnp.ones((L, D), dtype)
  layers['mlp_norm'] = jnp.ones((L, D), dtype)
  return dict(rand, layers=layers, final_norm=jnp.ones((D,), dtype))


def sublayer_stats(params: Params, config: LlamaConfig, tokens_BT: jax.Array, cache: KVCache,
                   start: jax.Array, stat_fn) -> jax.Array:
  """Per-layer statistics of the two sub-layer outputs over a chunk; the cache is only read.

  The chunk's T tokens sit at positions [start, start + T); they attend to the cached rows
  [0, start) and causally to one another, every layer running (no skip set). For each layer,
  `stat_fn(attn_BTD, mlp_BTD)` sees the attention output (after the output projection) and
  the MLP output, both before their residual adds, in float32. Reducing inside the layer loop
  means the [L, B, T, D] outputs never exist at once; nothing is written to the cache, so a
  summary of the context (ConfLayers' layer confidence) can be taken between rounds.

  The MLP output is read back as the layer output minus the residual stream after attention,
  so the layer itself is computed by `_finish_layer`, exactly as `forward` computes it.

  Args:
    params: the params pytree (stacked or per layer).
    config: the model config.
    tokens_BT: int32 token ids.
    cache: the KV cache; rows [0, start) must hold every layer's keys and values.
    start: int32 scalar, the chunk's first position.
    stat_fn: (attn_BTD, mlp_BTD) -> array of a fixed shape X (jittable).

  Returns:
    The statistics of every layer stacked, [L, *X].
  """
  B, T = tokens_BT.shape
  cos_BTh, sin_BTh = rope_tables(config, start + jnp.broadcast_to(jnp.arange(T), (B, T)))

  def step(a, lp, x_BTD):
    q_BTHh, k_BTKh, v_BTKh = _qkv(lp, config, x_BTD, cos_BTh, sin_BTh)  # or packed
    attn_BTq = attention_lib.cache_attention(q_BTHh, k_BTKh, v_BTKh, cache.k_LBSKh,
                                             cache.v_LBSKh, a, start)
    attn_BTD = _product(_closing_product, attn_BTq, lp['wo'])
    mid_BTD = x_BTD + attn_BTD
    out_BTD = _finish_layer(lp, config, x_BTD, attn_BTq)
    mlp_BTD = out_BTD.astype(jnp.float32) - mid_BTD.astype(jnp.float32)
    return out_BTD, stat_fn(attn_BTD.astype(jnp.float32), mlp_BTD)

  _, stats_LX = scan_layers(params, step, params['embed'][tokens_BT])
  return stats_LX
