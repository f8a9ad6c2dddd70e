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

Together with matrix products whose shapes do not depend on the pass (see
`engine.default_pass_width`) this makes every full-model pass compute a token's logits the
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
                    riders: Riders | None = None) -> jax.Array:
  """Causal grouped-query attention of a chunk over the cache and itself.

  Query t sits at position start + t and sees every key at a position <= its own: cached
  keys of layer `layer` below `start`, the chunk's own keys from `start` on. The cache is
  only read. Rows from `riders.first_row` on are riders (see `Riders`).

  Args:
    q_BTHh: roped queries of the chunk (or q, k and v packed, see `split_packed`).
    k_BTKh: the chunk's roped keys (None when packed).
    v_BTKh: the chunk's values (None when packed).
    cache_k_LBSKh: every layer's cached keys; S a multiple of ATTENTION_BLOCK.
    cache_v_LBSKh: every layer's cached values.
    layer: which layer's cache to read (static or traced).
    start: int32 scalar, the chunk's first position (start + T <= S).
    riders: optional rows of the chunk that are riders, not tokens.

  Returns:
    The attention output [B, T, H*hd] in the queries' dtype.
  """
  if k_BTKh is None:
    q_BTHh, k_BTKh, v_BTKh = split_packed(q_BTHh, cache_k_LBSKh.shape[3])
  B, T, H, hd = q_BTHh.shape
  KV = k_BTKh.shape[2]
  G = H // KV
  size = ATTENTION_BLOCK
  q_BKGTh = q_BTHh.reshape(B, T, KV, G, hd).transpose(0, 2, 3, 1, 4)
  last_T, own_T = row_limits(T, start, riders)

  def block(b, carry, *, merge: bool):
    m_BKGT, l_BKGT, o_BKGTh = carry
    block_start = b * size
    if merge:
      k_BSKh = merged_block(cache_k_LBSKh, k_BTKh, layer, start, block_start, size)
      v_BSKh = merged_block(cache_v_LBSKh, v_BTKh, layer, start, block_start, size)
    else:  # wholly below `start`: the cache's keys as they are, the same values unmerged
      k_BSKh = cached_block(cache_k_LBSKh, layer, block_start, size)
      v_BSKh = cached_block(cache_v_LBSKh, layer, block_start, size)
    key_S = block_start + jnp.arange(size)
    visible_TS = key_S[None, :] <= last_T[:, None]
    if own_T is not None:
      visible_TS |= key_S[None, :] == own_T[:, None]
    s_BKGTS = jnp.einsum('bkgth,bskh->bkgts', q_BKGTh, k_BSKh,
                         preferred_element_type=jnp.float32) / math.sqrt(hd)
    s_BKGTS = jnp.where(visible_TS, s_BKGTS, -jnp.inf)
    m_new_BKGT = jnp.maximum(m_BKGT, jnp.max(s_BKGTS, axis=-1))
    # Exactly 1 where the maximum did not move (a block wholly after the query included).
    alpha_BKGT = jnp.where(m_new_BKGT == m_BKGT, 1.0, jnp.exp(m_BKGT - m_new_BKGT))
    p_BKGTS = jnp.where(visible_TS, jnp.exp(s_BKGTS - m_new_BKGT[..., None]), 0.0)
    l_BKGT = l_BKGT * alpha_BKGT + jnp.sum(p_BKGTS, axis=-1)
    pv_BKGTh = jnp.einsum('bkgts,bskh->bkgth', p_BKGTS.astype(v_BSKh.dtype), v_BSKh,
                          preferred_element_type=jnp.float32)
    return m_new_BKGT, l_BKGT, o_BKGTh * alpha_BKGT[..., None] + pv_BKGTh

  # Queries past the capacity (padding rows of a window that overhangs it) see up to its end.
  num_blocks = jnp.minimum((start + T + size - 1) // size, cache_k_LBSKh.shape[2] // size)
  init = (jnp.full((B, KV, G, T), -jnp.inf, jnp.float32), jnp.zeros((B, KV, G, T), jnp.float32),
          jnp.zeros((B, KV, G, T, hd), jnp.float32))
  # The blocks wholly below `start` skip the merge with the chunk (on a CPU its gather and
  # select cost ~15% of a decode step's attention at 800 tokens of context); the order of
  # the blocks, and so the result, stays the same bit for bit.
  num_cached = jnp.minimum(start // size, num_blocks)
  carry = jax.lax.fori_loop(0, num_cached, functools.partial(block, merge=False), init)
  _, l_BKGT, o_BKGTh = jax.lax.fori_loop(num_cached, num_blocks,
                                         functools.partial(block, merge=True), carry)
  out_BKGTh = (o_BKGTh / l_BKGT[..., None]).astype(q_BTHh.dtype)
  return out_BKGTh.transpose(0, 3, 1, 2, 4).reshape(B, T, H * hd)


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
