"""Attention over the KV cache: one reduction order, whichever pass a token sits in.

A token's logits must come out bit for bit the same whether the token is the only real row
of a plain decoding step or row j of a verify pass, or the drafting methods would part from
plain decoding at near-ties (in bfloat16, within a few tokens). For attention that means the
reduction over a query's keys may depend on nothing but the query's position and the keys'
values, so here:

- Keys live at absolute positions. A chunk of T new tokens at positions [start, start + T)
  sees the cached keys below `start` and its own keys from `start` on, merged position by
  position into one sequence of keys (the values a write into the cache followed by a read
  would give, without the write: the cache is only read inside the layer loop, and the
  caller writes the chunk's rows after it).
- The keys are reduced in blocks of `ATTENTION_BLOCK` positions counted from position 0, with
  an online softmax carried from block to block in a fixed order. Blocks wholly after a
  query's position change nothing for that query (its running maximum stays, its weights are
  exactly zero), so neither the chunk's width, nor the query's row in it, nor the cache's
  capacity changes the result.
- One exception to the width: a 1-row chunk (every pass of a decoder at pass width 1, and
  drafting steps) reduces the same blocks in the same order, but its products are laid out
  for a single row, which on a CPU saves copying every block (`row_attention`). Its bits may
  differ from the same query's in a wider chunk. A decoder runs all of its full-model passes
  at one width (`engine.full_pass`), so no committed token depends on which of the two ran;
  or, where its passes compute their rows apart (`engine.Decoder`'s `rows_apart`, on a CPU),
  every pass through `cpu_attention`'s kernel, which computes each row of any chunk as a
  1-row chunk; `row_attention` for T rows is its plain `jnp` reference.

Together with matrix products whose shapes do not depend on the pass (see
`widths.default_pass_width`) this makes every full-model pass compute a token's logits the
same way. This module is the plain `jnp` version: the CPU and TPU path, and the reference
that `attention_pallas` (the fused GPU kernel) is tested against.

One pass is exempt: the prefill of a new prompt in one pass, which starts at position 0 with
nothing cached. Its rows are computed once, by the same program for every method of a decoder,
so no other pass has to match them, and on a GPU it attends through cuDNN's fused causal
attention (`prompt_attention`) rather than block by block.

Every attention here and in `attention_pallas` takes the chunk's queries, keys and values as
three arrays, or packed into one (`k` and `v` then None): [B, T, n, H/n + 2 KV/n, hd], shard
i's query, key and value heads side by side, as the fused q/k/v product lays them out
(`model.fuse_projections`). Packed, one kernel makes all three and the fused kernel reads
them where they are (see `split_packed`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from clasp_jax import xla_options

#: Keys are reduced in blocks of this many absolute positions; cache capacities are multiples.
ATTENTION_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class Riders:
  """The chunk rows from `first_row` on hold riders (`model.Ride`), not the next tokens.

  Each rider sits at position `pos` (at most the chunk's start) and sees the cached keys
  below `pos` and its own key only, as `prefix_attention`'s queries do. The real rows before
  them see what they see without riders (riders come after them, beyond their causal reach),
  so a pass computes them bit for bit alike with riders or without; the riders attend in the
  same kernel instead of one of their own.

  Attributes:
    first_row: the first rider's chunk row (static).
    pos: int32 scalar, the riders' position.
  """

  first_row: int
  pos: jax.Array


jax.tree_util.register_dataclass(Riders, data_fields=['pos'], meta_fields=['first_row'])


def row_limits(num_tokens: int, start: jax.Array, riders: Riders | None
               ) -> tuple[jax.Array, jax.Array | None]:
  """Per chunk row, the last position whose key it sees in order (int32 [T]), and the
  position of the one key beyond it a rider also sees, its own (int32 [T]; None without
  riders): a key at position p is visible to row t iff p <= last_T[t] or p == own_T[t]."""
  row_T = jnp.arange(num_tokens, dtype=jnp.int32)
  own_T = start + row_T  # where row t's own key sits among the chunk's
  if riders is None:
    return own_T, None
  return jnp.where(row_T >= riders.first_row, riders.pos - 1, own_T), own_T


def split_packed(qkv_BTnNh: jax.Array, num_kv_heads: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q [B, T, H, hd], k and v [B, T, KV, hd] out of a packed array (see the module docstring).

  A plain `jnp` split, for attentions that take three arrays; the fused kernel reads the
  packed array in place instead.
  """
  B, T, n, N, hd = qkv_BTnNh.shape
  kv = num_kv_heads // n  # KV heads per shard
  q_BTnGh, k_BTnKh, v_BTnKh = jnp.split(qkv_BTnNh, [N - 2 * kv, N - kv], axis=3)
  return (q_BTnGh.reshape(B, T, -1, hd), k_BTnKh.reshape(B, T, -1, hd),
          v_BTnKh.reshape(B, T, -1, hd))


def cached_block(cache_LBSKh: jax.Array, layer: jax.Array | int, block_start: jax.Array,
                 size: int) -> jax.Array:
  """The cache's keys (or values) at positions [block_start, block_start + size) of one layer:
  [B, size, KV, hd]."""
  _, B, _, KV, hd = cache_LBSKh.shape
  return jax.lax.dynamic_slice(cache_LBSKh, (layer, 0, block_start, 0, 0),
                               (1, B, size, KV, hd))[0]


def merged_block(cache_LBSKh: jax.Array, chunk_BTKh: jax.Array, layer: jax.Array | int,
                 start: jax.Array, block_start: jax.Array, size: int) -> jax.Array:
  """Keys (or values) at positions [block_start, block_start + size) of one layer: the
  chunk's rows where the chunk covers them (positions >= start), the cache's otherwise.

  Returns:
    [B, size, KV, hd] in the cache's dtype.
  """
  T = chunk_BTKh.shape[1]
  cached_BSKh = cached_block(cache_LBSKh, layer, block_start, size)
  row_S = block_start + jnp.arange(size) - start  # the chunk row at each position
  in_chunk_S = (row_S >= 0) & (row_S < T)
  chunk_BSKh = jnp.take(chunk_BTKh.astype(cache_LBSKh.dtype), jnp.clip(row_S, 0, T - 1),
                        axis=1)
  return jnp.where(in_chunk_S[None, :, None, None], chunk_BSKh, cached_BSKh)


def cache_attention(q_BTHh: jax.Array, k_BTKh: jax.Array, v_BTKh: jax.Array,
                    cache_k_LBSKh: jax.Array, cache_v_LBSKh: jax.Array,
                    layer: jax.Array | int, start: jax.Array,
                    riders: Riders | None = None, *, num_rows: int | None = None) -> jax.Array:
  """Causal grouped-query attention of a chunk over the cache and itself.

  Query t sits at position start + t and sees every key at a position <= its own: cached
  keys of layer `layer` below `start`, the chunk's own keys from `start` on. The cache is
  only read. Rows from `riders.first_row` on are riders (see `Riders`). A chunk of one row
  and no riders takes `row_attention`, any other `_chunk_attention` (see the module
  docstring).

  Args:
    q_BTHh: roped queries of the chunk (or q, k and v packed, see `split_packed`).
    k_BTKh: the chunk's roped keys (None when packed).
    v_BTKh: the chunk's values (None when packed).
    cache_k_LBSKh: every layer's cached keys; S a multiple of ATTENTION_BLOCK.
    cache_v_LBSKh: every layer's cached values.
    layer: which layer's cache to read (static or traced).
    start: int32 scalar, the chunk's first position (start + T <= S).
    riders: optional rows of the chunk that are riders, not tokens.
    num_rows: optional, the chunk's real rows where the rest pad it (static; none with
      riders): no caller reads the padding rows' outputs, and the attention returns zeros
      there (the fused GPU kernel does no work for them).

  Returns:
    The attention output [B, T, H*hd] in the queries' dtype.
  """
  if k_BTKh is None:
    q_BTHh, k_BTKh, v_BTKh = split_packed(q_BTHh, cache_k_LBSKh.shape[3])
  B, T = q_BTHh.shape[:2]
  attend = row_attention if B == T == 1 and riders is None else _chunk_attention
  return padding_zeroed(
      attend(q_BTHh, k_BTKh, v_BTKh, cache_k_LBSKh, cache_v_LBSKh, layer, start, riders),
      num_rows)


def padding_zeroed(out_BTX: jax.Array, num_rows: int | None) -> jax.Array:
  """An attention output with the rows from `num_rows` on (the chunk's padding) zeroed."""
  if num_rows is None:
    return out_BTX
  return jnp.where(jnp.arange(out_BTX.shape[1])[None, :, None] < num_rows, out_BTX, 0)


def _over_blocks(update, init, cache_k_LBSKh: jax.Array, cache_v_LBSKh: jax.Array,
                 k_BTKh: jax.Array, v_BTKh: jax.Array, layer: jax.Array | int,
                 start: jax.Array):
  """Folds `update(carry, k_BSKh, v_BSKh, key_S)` over the blocks of keys a chunk of T rows at
  `start` sees, in position order from position 0: each block's keys and values (the cache's
  below `start`, the chunk's from it on) and their positions.

  The blocks wholly below `start` skip the merge with the chunk (on a CPU its gather and
  select cost ~15% of a decode step's attention at 800 tokens of context); the order of the
  blocks, and so the result, stays the same bit for bit.
  """
  size = ATTENTION_BLOCK
  T = k_BTKh.shape[1]

  def block(b, carry, *, merge: bool):
    block_start = b * size
    if merge:
      k_BSKh = merged_block(cache_k_LBSKh, k_BTKh, layer, start, block_start, size)
      v_BSKh = merged_block(cache_v_LBSKh, v_BTKh, layer, start, block_start, size)
    else:  # wholly below `start`: the cache's keys as they are, the same values unmerged
      k_BSKh = cached_block(cache_k_LBSKh, layer, block_start, size)
      v_BSKh = cached_block(cache_v_LBSKh, layer, block_start, size)
    return update(carry, k_BSKh, v_BSKh, block_start + jnp.arange(size))

  # Queries past the capacity (padding rows of a window that overhangs it) see up to its end.
  num_blocks = jnp.minimum((start + T + size - 1) // size, cache_k_LBSKh.shape[2] // size)
  num_cached = jnp.minimum(start // size, num_blocks)
  carry = jax.lax.fori_loop(0, num_cached, functools.partial(block, merge=False), init)
  return jax.lax.fori_loop(num_cached, num_blocks, functools.partial(block, merge=True), carry)


def _softmax_step(carry, s_XS: jax.Array, visible_XS: jax.Array, weigh_values):
  """One block's update of an online softmax: the running maximum m_X, sum l_X and output
  o_XY (float32) after the block's scores s_XS (keys last), those not visible to a row
  counted as absent. `weigh_values(p_XS)` is the block's weights times its values."""
  m_X, l_X, o_XY = carry
  s_XS = jnp.where(visible_XS, s_XS, -jnp.inf)
  m_new_X = jnp.maximum(m_X, _reduce_keys(jnp.max, s_XS))
  # Exactly 1 where the maximum did not move (a block wholly after the query included).
  alpha_X = jnp.where(m_new_X == m_X, 1.0, jnp.exp(m_X - m_new_X))
  p_XS = jnp.where(visible_XS, jnp.exp(s_XS - m_new_X[..., None]), 0.0)
  l_X = l_X * alpha_X + _reduce_keys(jnp.sum, p_XS)
  return m_new_X, l_X, o_XY * alpha_X[..., None] + weigh_values(p_XS)


#: On a CPU `_reduce_keys` reduces a block's keys in groups of this many (XLA's CPU
#: tree-reduction width).
KEY_GROUP = 32


def _reduce_keys(op, x_XS: jax.Array) -> jax.Array:
  """`op(x, axis=-1)` over a block's keys; on a CPU as a reduction within groups of
  KEY_GROUP keys, then one over the groups.

  That is the order XLA's CPU compiler gives a reduction over more than 32 elements anyway
  (its tree-reduction rewrite), but as a windowed reduction, slow there. The barrier keeps
  the simplifier from merging the two reductions back into one. On a 2-core Xeon the
  windowed reductions made the attention of a 769-token prompt's prefill 1.2x slower
  (SmolLM2-135M's shapes; docs/results/cpu/cache_attention/).
  """
  if xla_options.platform() != 'cpu':
    return op(x_XS, axis=-1)
  groups_XG = op(x_XS.reshape(*x_XS.shape[:-1], -1, KEY_GROUP), axis=-1)
  return op(jax.lax.optimization_barrier(groups_XG), axis=-1)


def _chunk_attention(q_BTHh: jax.Array, k_BTKh: jax.Array, v_BTKh: jax.Array,
                     cache_k_LBSKh: jax.Array, cache_v_LBSKh: jax.Array,
                     layer: jax.Array | int, start: jax.Array,
                     riders: Riders | None) -> jax.Array:
  """`cache_attention` of a chunk of any width: each block's products batched over the KV
  heads (on a CPU, a transposing copy of the block's keys and values)."""
  B, T, H, hd = q_BTHh.shape
  KV = k_BTKh.shape[2]
  G = H // KV
  q_BKGTh = q_BTHh.reshape(B, T, KV, G, hd).transpose(0, 2, 3, 1, 4)
  last_T, own_T = row_limits(T, start, riders)

  def update(carry, k_BSKh, v_BSKh, key_S):
    visible_TS = key_S[None, :] <= last_T[:, None]
    if own_T is not None:
      visible_TS |= key_S[None, :] == own_T[:, None]
    s_BKGTS = jnp.einsum('bkgth,bskh->bkgts', q_BKGTh, k_BSKh,
                         preferred_element_type=jnp.float32) / math.sqrt(hd)
    return _softmax_step(carry, s_BKGTS, visible_TS, lambda p_BKGTS: jnp.einsum(
        'bkgts,bskh->bkgth', p_BKGTS.astype(v_BSKh.dtype), v_BSKh,
        preferred_element_type=jnp.float32))

  init = (jnp.full((B, KV, G, T), -jnp.inf, jnp.float32), jnp.zeros((B, KV, G, T), jnp.float32),
          jnp.zeros((B, KV, G, T, hd), jnp.float32))
  _, l_BKGT, o_BKGTh = _over_blocks(update, init, cache_k_LBSKh, cache_v_LBSKh, k_BTKh, v_BTKh,
                                    layer, start)
  out_BKGTh = (o_BKGTh / l_BKGT[..., None]).astype(q_BTHh.dtype)
  return out_BKGTh.transpose(0, 3, 1, 2, 4).reshape(B, T, H * hd)


def row_attention(q_1THh: jax.Array, k_1TKh: jax.Array | None, v_1TKh: jax.Array | None,
                  cache_k_LBSKh: jax.Array, cache_v_LBSKh: jax.Array,
                  layer: jax.Array | int, start: jax.Array,
                  riders: Riders | None = None) -> jax.Array:
  """`cache_attention` of a chunk of T rows (batch 1), each row computed as a chunk of that
  row alone would compute it: the same blocks in the same order, each block's products plain
  matrix products of one row's queries over the block's keys as they lie, every KV head side
  by side.

  A query's row holds zeros outside its own KV head's columns, so a score sums exact zeros
  besides its own head's terms, and each row keeps its own head's columns of the product with
  the values. For one row, the batched products of `_chunk_attention` would first copy each
  block's keys and values into heads-first order: on a 2-core Xeon this path made a token of
  plain decoding at width 1 1.10x faster after 660-769 tokens (SmolLM2-135M;
  docs/results/cpu/cache_attention/). For more rows it costs a product per row, and computes
  each row as that row alone would, up to how XLA compiles each program: the reference of the
  CPU kernel (`cpu_attention`) that a decoder whose passes compute their rows apart runs.

  Riders (see `Riders`) are rows like the others, each seeing what `row_limits` gives it.
  """
  if k_1TKh is None:
    q_1THh, k_1TKh, v_1TKh = split_packed(q_1THh, cache_k_LBSKh.shape[3])
  B, T, H, hd = q_1THh.shape
  if B != 1:
    raise ValueError(f'row_attention takes a batch of one, got {B}')
  KV = cache_k_LBSKh.shape[3]
  G = H // KV
  dtype = cache_k_LBSKh.dtype
  eye_KK = jnp.eye(KV, dtype=q_1THh.dtype)
  # Row k * G + g of a query holds head (k, g) in the columns of its KV head k, zeros
  # elsewhere; in the cache's dtype, as the blocks it multiplies.
  q_TXY = (q_1THh[0].reshape(T, KV, G, 1, hd) * eye_KK[None, :, None, :, None]).reshape(
      T, H, KV * hd).astype(dtype)
  last_T, own_T = row_limits(T, start, riders)

  def update(carry, k_1SKh, v_1SKh, key_S):
    k_SY, v_SY = (x[0].reshape(key_S.shape[0], KV * hd) for x in (k_1SKh, v_1SKh))
    rows = []
    for t in range(T):  # one row's products at a time, as a 1-row chunk's
      visible_1S = (key_S <= last_T[t])[None]
      if own_T is not None:
        visible_1S |= (key_S == own_T[t])[None]
      s_XS = jax.lax.dot_general(q_TXY[t], k_SY, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) / math.sqrt(hd)
      rows.append(_softmax_step(
          jax.tree.map(lambda c: c[t], carry), s_XS, visible_1S,
          lambda p_XS: jnp.dot(p_XS.astype(dtype), v_SY, preferred_element_type=jnp.float32)))
    return jax.tree.map(lambda *c: jnp.stack(c), *rows)

  init = (jnp.full((T, H), -jnp.inf, jnp.float32), jnp.zeros((T, H), jnp.float32),
          jnp.zeros((T, H, KV * hd), jnp.float32))
  _, l_TX, o_TXY = _over_blocks(update, init, cache_k_LBSKh, cache_v_LBSKh, k_1TKh, v_1TKh,
                                layer, start)
  heads_K = jnp.arange(KV)
  o_KTGh = o_TXY.reshape(T, KV, G, KV, hd)[:, heads_K, :, heads_K]  # each row's own head's
  out_THh = o_KTGh.transpose(1, 0, 2, 3).reshape(T, H, hd) / l_TX[..., None]
  return out_THh.astype(q_1THh.dtype).reshape(1, T, H * hd)


def prefix_attention(q_BTHh: jax.Array, k_BTKh: jax.Array, v_BTKh: jax.Array,
                     cache_k_LBSKh: jax.Array, cache_v_LBSKh: jax.Array,
                     layer: jax.Array | int, pos: jax.Array) -> jax.Array:
  """Attention of T queries that all sit at position `pos`, each seeing the cached keys of
  layer `layer` below `pos` and its own key only (the CLaSp DP's pseudo-tokens).

  Args: as `cache_attention`, with `pos` for `start`; batch row 0 of the cache is read (B = 1).

  Returns:
    The attention output [1, T, H*hd] in the queries' dtype.
  """
  if k_BTKh is None:
    q_BTHh, k_BTKh, v_BTKh = split_packed(q_BTHh, cache_k_LBSKh.shape[3])
  T = q_BTHh.shape[1]
  k_1SKh, v_1SKh = cache_k_LBSKh[layer, :1], cache_v_LBSKh[layer, :1]
  prefix_11S = (jnp.arange(cache_k_LBSKh.shape[2]) < pos)[None, None]
  return segment_attention(
      q_BTHh, [(k_1SKh, v_1SKh, prefix_11S),
               (k_BTKh.astype(k_1SKh.dtype), v_BTKh.astype(v_1SKh.dtype),
                jnp.eye(T, dtype=bool)[None])]).astype(q_BTHh.dtype)


def segment_attention(q_BTHh: jax.Array,
                      segments: list[tuple[jax.Array, jax.Array, jax.Array]]) -> jax.Array:
  """Grouped-query attention of T queries over several key/value segments at once.

  One softmax (float32) spans every segment. For passes whose numerics decide no committed
  token: the CLaSp DP's pseudo-tokens, which all sit at one position and each see only the
  cached prefix and themselves.

  Args:
    q_BTHh: roped queries.
    segments: (k_BSKh, v_BSKh, mask_BTS) triples; the mask broadcasts over B and T.

  Returns:
    The attention output [B, T, H*hd].
  """
  B, T, H, hd = q_BTHh.shape
  KV = segments[0][0].shape[2]
  q_BTKGh = q_BTHh.reshape(B, T, KV, H // KV, hd)
  scores = [jnp.where(mask_BTS[:, None, None],
                      jnp.einsum('btkgh,bskh->bkgts', q_BTKGh, k_BSKh,
                                 preferred_element_type=jnp.float32) / math.sqrt(hd), -jnp.inf)
            for k_BSKh, _, mask_BTS in segments]
  probs_BKGTX = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
  splits = [sum(sc.shape[-1] for sc in scores[:i + 1]) for i in range(len(scores) - 1)]
  out_BTKGh = sum(jnp.einsum('bkgts,bskh->btkgh', p_BKGTS.astype(v_BSKh.dtype), v_BSKh)
                  for p_BKGTS, (_, v_BSKh, _) in zip(jnp.split(probs_BKGTX, splits, -1),
                                                     segments))
  return out_BTKGh.reshape(B, T, H * hd)


def prompt_attention(q_BTHh: jax.Array, k_BTKh: jax.Array | None, v_BTKh: jax.Array | None,
                     cache_k_LBSKh: jax.Array, cache_v_LBSKh: jax.Array,
                     layer: jax.Array | int, start: jax.Array, riders: Riders | None = None, *,
                     implementation: str | None = 'cudnn') -> jax.Array:
  """Causal grouped-query attention of a chunk at position 0 over its own keys: a new
  prompt's one-pass prefill, before anything is cached.

  One fused kernel on a GPU (cuDNN's flash attention, `jax.nn.dot_product_attention`) where
  `cache_attention` runs a loop of small kernels per block of keys. Its reduction order is
  cuDNN's: see the module docstring for why the prefill may differ from `cache_attention`.

  Args:
    q_BTHh, k_BTKh, v_BTKh: as `cache_attention`'s (k and v None: packed).
    cache_k_LBSKh, cache_v_LBSKh: the (empty) cache, for its KV head count and dtype only.
    layer: unused (the signature is `cache_attention`'s).
    start: unused: the chunk must start at position 0.
    riders: must be None.
    implementation: `jax.nn.dot_product_attention`'s ('cudnn'; 'xla' runs anywhere).

  Returns:
    The attention output [B, T, H*hd] in the queries' dtype.
  """
  del layer, start
  if riders is not None:
    raise ValueError('the prompt attention takes no riders')
  if k_BTKh is None:
    q_BTHh, k_BTKh, v_BTKh = split_packed(q_BTHh, cache_k_LBSKh.shape[3])
  B, T, H, hd = q_BTHh.shape
  dtype = cache_k_LBSKh.dtype  # keys and values as a later pass would read them back
  out_BTHh = jax.nn.dot_product_attention(q_BTHh.astype(dtype), k_BTKh.astype(dtype),
                                          v_BTKh.astype(dtype), is_causal=True,
                                          implementation=implementation)
  return out_BTHh.reshape(B, T, H * hd).astype(q_BTHh.dtype)


def fused_prompt_attention_runs(head_dim: int, dtype) -> bool:
  """Whether cuDNN's fused attention (`prompt_attention`) takes heads of `head_dim` in `dtype`
  on this machine: its own checks (cuDNN found, a GPU recent enough, 16-bit floats, the head
  size) run as it is traced, without compiling or running anything."""
  x = jax.ShapeDtypeStruct((1, 8, 1, head_dim), dtype)
  attend = functools.partial(jax.nn.dot_product_attention, is_causal=True,
                             implementation='cudnn')
  try:
    jax.eval_shape(attend, x, x, x)
  except (NotImplementedError, RuntimeError, ValueError):
    return False
  return True
