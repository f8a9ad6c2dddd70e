"""Fused GPU cache attention (Pallas, Triton lowering): `attention.cache_attention`'s contract.

The kernel keeps the reduction order of `attention` (see its module docstring): a query's
result depends only on its position and on the keys and values at positions up to it, never
on the chunk's width, the query's row in the chunk, `start` or the cache's capacity. It is
built so, not tuned so:

- Keys are reduced in blocks of `KEY_BLOCK` absolute positions counted from position 0, with
  an online softmax (running maximum m, sum l and accumulator o, all float32) carried from
  block to block in position order. A block wholly after a query leaves its m, l and o bit
  for bit unchanged (its rescaling factor is exactly 1, its weights exactly 0), so how many
  blocks a program runs past a query does not matter.
- Flash decoding: the grid runs over (KV head, row block, split), each split covering
  `split_size(KV)` absolute positions (a constant of the model, so the partition of
  positions never depends on the pass or the capacity). Splits wholly after the chunk run no
  block and write nothing. Every program handles one block of the KV head's real query rows
  (all of them unless that exceeds `MAX_ROW_BLOCK`), each row the same way.
- A second kernel folds the splits in position order, in groups of a fixed number of splits,
  up to the last one that holds a position the pass sees: a split after a query's position
  adds exact zeros to it, so where the fold stops changes nothing. The cache's capacity (how
  many splits there are) does not change the result, and its empty splits are neither
  written nor read; their programs still start, and exit at once.
- On a GPU a sum over a tile's row runs in the order of the tile's layout, which its number
  of rows sets, so the kernels keep none whose tile the pass sizes: a row's sum of weights
  over a block of keys is a product with ones, as its dot products are (their order is the
  matrix unit's, the same for every row block), and the fold sums splits in tiles of
  `FOLD_ROWS` rows whatever the pass. With a `jnp.sum` there and fold tiles sized by the
  chunk, a row's bits differed between a 1-, a 9- and a 16-row pass (an H100,
  `docs/results/h100/row_tiles/`); Pallas's interpret mode shows some of it, not all.
- A chunk's padding rows (`num_rows`: a plain step's pass holds one token in 16 rows) are
  neither loaded nor computed, and come out as zeros: a row's result does not depend on
  which other rows are computed.

The cache is only read, and only below `start`: positions from `start` on come from the
chunk's own keys and values (cast to the cache's dtype), and positions after the chunk are
loaded as zeros, so whatever the cache holds there never enters the arithmetic.

`prefix_attention_pallas` runs the same kernel for the CLaSp DP's pseudo-tokens, whose queries
all sit at one position and see the cache below it (and, outside the kernel, their own keys).
Pseudo-tokens that ride in a pass's padding rows (`attention.Riders`) attend in the pass's own
call instead: their rows see the cache below their position and their own key.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from clasp_jax import attention as attention_lib

#: Keys are reduced in blocks of this many absolute positions (a tl.dot dimension).
KEY_BLOCK = 64
#: Each program of the grid covers this many absolute positions (multiples of KEY_BLOCK):
#: SPLIT_SIZE, or SPLIT_SIZE_FEW_KV_HEADS for a model with fewer than FEW_KV_HEADS KV heads.
SPLIT_SIZE = 128
SPLIT_SIZE_FEW_KV_HEADS = 64
FEW_KV_HEADS = 8
#: Most query rows (the real rows of one KV head, padded to a power of two >= 16) one program
#: holds.
MAX_ROW_BLOCK = 64
#: The fold loads this many splits at once (a constant, so that its sums' order never depends
#: on the cache's capacity), for tiles of FOLD_ROWS rows (whatever the pass: the order of its
#: sums follows the tile's layout) and at most FOLD_COLS columns.
FOLD_GROUP = 16
FOLD_ROWS = 16
FOLD_COLS = 32
#: Triton launch parameters of both kernels. One stage (no software pipelining of a program's
#: blocks): on an H100 the split kernel took 12.2 µs a layer against 14.3 with two at the
#: LLaMA-3-8B shape and 4000 tokens of context, about the same at 1000 and at SmolLM2-135M's
#: shape, the fold the same, and the outputs bit for bit the same; plain decoding 2.0% faster
#: at 4096 tokens of context (docs/results/h100/attention_launch/). Other warp counts, key
#: blocks and fold tiles were no faster.
NUM_WARPS = 4
NUM_STAGES = 1


def split_size(num_kv_heads: int) -> int:
  """Positions a program covers, for a model with this many KV heads.

  The grid holds KV programs a split, and a program's blocks run one after the other, so
  shorter splits keep more of the GPU busy; each split's statistics are written and folded,
  so longer ones cost less there. On an H200 (docs/results/h200/decode/attention_fold/),
  with the fold reading only the splits a pass sees: at SmolLM2-135M's 3 KV heads, 64
  positions made the attention 6.0 µs a layer against 7.6 at 128 (1024 tokens of context);
  at LLaMA-3-8B's 8, 128 positions 10.8 µs against 14.2 at 256, while 64 (9.1 µs here) ran
  the split kernel slower than 128 and 256 at 4096 tokens of context.
  """
  return SPLIT_SIZE_FEW_KV_HEADS if num_kv_heads < FEW_KV_HEADS else SPLIT_SIZE


def _split_kernel(start_ref, layer_ref, *refs, num_tokens: int, num_rows: int, group: int,
                  own_keys: bool, first_rider: int, split: int, stride: tuple[int, int],
                  kv_offsets: tuple[int, int]):
  """One (KV head, row block, split) program: the online softmax over the split's keys.

  Refs: start_ref, layer_ref int32 scalars; with riders, rider_pos_ref, an int32 scalar;
  q_ref [T * stride[0], hd] (the chunk's queries as the caller holds them: row
  t * stride[0] + h is token t's query head h); k_ref, v_ref [T * stride[1], hd] (the chunk's
  keys and values, in the cache's dtype, row t * stride[1] + kv_offsets[0 or 1] + k): three
  arrays (strides H and KV, offsets 0) or one packed array passed three times (strides
  H + 2 KV, offsets H and H + KV); cache_k_ref, cache_v_ref the whole [L, S, KV, hd] caches
  (batch squeezed); m_ref, l_ref [R] and o_ref [R, hd] the split's float32 statistics for the
  program's R rows (row r of the KV head being token r // G, query head r % G). Every input
  is read in place: no layout copies around the call. Rows of tokens from `num_rows` on are
  padding, loaded as zeros, and so are their keys: no row sees them. `own_keys` False: every
  row sees the cache below `start` only (see `prefix_attention`); tokens from `first_rider`
  on are riders at position rider_pos (`attention.Riders`; none when it is `num_tokens`, and
  then the kernel is the one of a pass without riders); `split` the positions a program
  covers.
  """
  riders = own_keys and first_rider < num_tokens
  rider_pos_ref, refs = (refs[0], refs[1:]) if riders else (None, refs)
  q_ref, k_ref, v_ref, cache_k_ref, cache_v_ref, m_ref, l_ref, o_ref = refs
  kv = pl.program_id(0)
  row_block = pl.program_id(1)
  split_start = pl.program_id(2) * split
  start = start_ref[()]
  layer = layer_ref[()]
  R, hd = o_ref.shape
  hd_h = jnp.arange(hd, dtype=jnp.int32)
  # The program's rows of this KV head: token x // G, query head kv * G + x % G; rows from
  # num_rows * G on are padding, loaded as zeros (their results are never read).
  x_R = row_block * R + jnp.arange(R, dtype=jnp.int32)
  token_R = lax.div(x_R, group)
  q_row_R = token_R * stride[0] + kv * group + lax.rem(x_R, group)
  real_R = x_R < num_rows * group
  q_Rh = plgpu.load(q_ref.at[jnp.where(real_R, q_row_R, 0)[:, None], hd_h[None, :]],
                    mask=jnp.broadcast_to(real_R[:, None], (R, hd)), other=0)
  # The last position each row sees in order (a rider also sees its own key, at own_R), and
  # one past the last any row sees.
  own_R = start + token_R
  if own_keys:
    last_R = own_R
    if riders:
      last_R = jnp.where(token_R >= first_rider, rider_pos_ref[()] - 1, own_R)
    end = start + num_rows
  else:
    last_R = jnp.full((R,), start - 1, jnp.int32)
    end = start
  # Blocks up to `end`; none for a split wholly after it. The first `num_cached` of them lie
  # wholly below `start`: the cache alone holds their keys.
  span = jnp.minimum(jnp.maximum(end - split_start, 0), split)
  num_blocks = lax.div(span + KEY_BLOCK - 1, KEY_BLOCK)
  num_cached = jnp.minimum(lax.div(jnp.maximum(start - split_start, 0), KEY_BLOCK), num_blocks)

  def cached(cache_ref, chunk_ref, offset, block_start, pos_C):
    """[KEY_BLOCK, hd] keys (or values) of a block wholly below `start`: the cache's."""
    del chunk_ref, offset, pos_C
    return plgpu.load(cache_ref.at[layer, pl.ds(block_start, KEY_BLOCK), kv, :])

  def merged(cache_ref, chunk_ref, offset, block_start, pos_C):
    """[KEY_BLOCK, hd] keys (or values) at positions pos_C = [block_start, + KEY_BLOCK): the
    cache's below `start`, the real rows' in [start, start + num_rows), zeros after (as
    `attention.merged_block`, except that it never reads the cache at or after `start`)."""
    shape = (KEY_BLOCK, hd)
    cached_Ch = plgpu.load(cache_ref.at[layer, pl.ds(block_start, KEY_BLOCK), kv, :],
                           mask=jnp.broadcast_to((pos_C < start)[:, None], shape), other=0)
    row_C = pos_C - start
    in_chunk_C = (row_C >= 0) & (row_C < num_rows)
    chunk_row_C = jnp.clip(row_C, 0, num_rows - 1) * stride[1] + offset + kv
    chunk_Ch = plgpu.load(chunk_ref.at[chunk_row_C[:, None], hd_h[None, :]],
                          mask=jnp.broadcast_to(in_chunk_C[:, None], shape), other=0)
    return jnp.where(in_chunk_C[:, None], chunk_Ch, cached_Ch)

  def block(b, carry, keys):
    """One block's update of the online softmax; `keys(cache_ref, chunk_ref, offset,
    block_start, pos_C)` loads its keys or values."""
    m_R, l_R, o_Rh = carry
    block_start = split_start + b * KEY_BLOCK
    pos_C = block_start + jnp.arange(KEY_BLOCK, dtype=jnp.int32)
    k_Ch = keys(cache_k_ref, k_ref, kv_offsets[0], block_start, pos_C)
    v_Ch = keys(cache_v_ref, v_ref, kv_offsets[1], block_start, pos_C)
    visible_RC = pos_C[None, :] <= last_R[:, None]
    if riders:
      visible_RC |= pos_C[None, :] == own_R[:, None]
    # HIGHEST: float32 products in IEEE float32 (Triton would use TF32 otherwise).
    s_RC = lax.dot_general(q_Rh, k_Ch, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32) / math.sqrt(hd)
    s_RC = jnp.where(visible_RC, s_RC, -jnp.inf)
    m_new_R = jnp.maximum(m_R, jnp.max(s_RC, axis=1))
    # Exactly 1 where the maximum did not move (a block wholly after the row included); the
    # where also keeps -inf - -inf (a row that has seen nothing yet) from making a NaN.
    alpha_R = jnp.where(m_new_R == m_R, 1.0, jnp.exp(m_R - m_new_R))
    p_RC = jnp.where(visible_RC, jnp.exp(s_RC - m_new_R[:, None]), 0.0).astype(v_Ch.dtype)
    # The weights' sum as a product with ones (see the module docstring; its 16 columns are
    # the same sum, the maximum picks one): of the weights as they meet the values.
    ones_C16 = jnp.ones((KEY_BLOCK, 16), v_Ch.dtype)
    sum_R = lax.dot_general(p_RC, ones_C16, (((1,), (0,)), ((), ())),
                            precision=lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32).max(axis=1)
    l_R = l_R * alpha_R + sum_R
    pv_Rh = lax.dot_general(p_RC, v_Ch, (((1,), (0,)), ((), ())),
                            precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return m_new_R, l_R, o_Rh * alpha_R[:, None] + pv_Rh

  init = (jnp.full((R,), -jnp.inf, jnp.float32), jnp.zeros((R,), jnp.float32),
          jnp.zeros((R, hd), jnp.float32))
  # Two loops, the same arithmetic block after block: the cached blocks' plain loads leave
  # the chunk's masked gathers to the one or two blocks that need them.
  carry = lax.fori_loop(0, num_cached, functools.partial(block, keys=cached), init)
  m_R, l_R, o_Rh = lax.fori_loop(num_cached, num_blocks, functools.partial(block, keys=merged),
                                 carry)

  @pl.when(num_blocks > 0)  # the fold reads no split wholly after the chunk
  def _():
    m_ref[...] = m_R
    l_ref[...] = l_R
    o_ref[...] = o_Rh


def split_stats(q_BTHh: jax.Array, k_BTKh: jax.Array, v_BTKh: jax.Array,
                cache_k_LBSKh: jax.Array, cache_v_LBSKh: jax.Array, layer: jax.Array | int,
                start: jax.Array | int, riders: attention_lib.Riders | None = None, *,
                own_keys: bool = True, num_rows: int | None = None,
                interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Runs the kernel: every split's online-softmax statistics, before the fold.

  Args: as `cache_attention_pallas`; `own_keys` False: every query sees the cache below
    `start` only, none of the chunk's keys.

  Returns:
    (m_PKX, l_PKX, o_PKXh), float32: per split P, KV head K and query row X (row t * G + g
    is token t's query head g of that KV head; rows from num_rows * G on are padding), the
    running maximum, the sum of the weights and the unnormalized output. A split wholly at or
    after the last position any query sees is left unwritten (`fold` reads none of them).
  """
  L, _, S, KV, hd = cache_k_LBSKh.shape
  B, T = q_BTHh.shape[:2]
  H = _num_heads(q_BTHh, k_BTKh, KV)
  G = H // KV
  dtype = cache_k_LBSKh.dtype
  assert B == 1, f'batch 1 only, got {B}'
  assert H == G * KV, f'{H} query heads over {KV} KV heads'
  assert hd >= 16 and hd & (hd - 1) == 0, f'head dim {hd}: Triton wants a power of two >= 16'
  split = split_size(KV)
  assert S % KEY_BLOCK == 0 and split % KEY_BLOCK == 0, (S, KEY_BLOCK, split)
  assert q_BTHh.dtype == dtype == cache_v_LBSKh.dtype, (q_BTHh.dtype, dtype)
  num_rows = T if num_rows is None else num_rows
  assert 0 < num_rows <= T and (riders is None or num_rows == T), (num_rows, T, riders)
  # The real rows in as few programs as hold them (tl.dot wants >= 16).
  rows = min(MAX_ROW_BLOCK, max(16, pl.next_power_of_2(num_rows * G)))
  num_row_blocks = pl.cdiv(num_rows * G, rows)
  num_splits = pl.cdiv(S, split)
  X = num_row_blocks * rows
  # Free reshapes: the kernel reads the chunk's rows where they are.
  if k_BTKh is None:  # packed, one shard (a mesh runs the kernel per device)
    assert q_BTHh.shape[2] == 1, f'packed q/k/v of {q_BTHh.shape[2]} shards on one device'
    q_Xh = k_Xh = v_Xh = q_BTHh[0].reshape(T * (H + 2 * KV), hd)
    stride, kv_offsets = (H + 2 * KV,) * 2, (H, H + KV)
  else:
    q_Xh = q_BTHh[0].reshape(T * H, hd)
    k_Xh, v_Xh = (x[0].astype(dtype).reshape(T * KV, hd) for x in (k_BTKh, v_BTKh))
    stride, kv_offsets = (H, KV), (0, 0)

  scalars = (start, layer) + (() if riders is None else (riders.pos,))
  scalars = tuple(_int32(x) for x in scalars)
  scalar_spec = pl.BlockSpec((), lambda k, r, p: ())
  def whole_spec(rows):
    return pl.BlockSpec((rows, hd), lambda k, r, p: (0, 0))
  # The whole cache, batch squeezed: the layer is a kernel input, never a block index.
  cache_spec = pl.BlockSpec((L, None, S, KV, hd), lambda k, r, p: (0, 0, 0, 0, 0))
  stat_spec = pl.BlockSpec((None, None, rows), lambda k, r, p: (p, k, r))
  return pl.pallas_call(
      functools.partial(_split_kernel, num_tokens=T, num_rows=num_rows, group=G,
                        own_keys=own_keys,
                        first_rider=T if riders is None else riders.first_row, split=split,
                        stride=stride, kv_offsets=kv_offsets),
      grid=(KV, num_row_blocks, num_splits),
      in_specs=[scalar_spec] * len(scalars)
               + [whole_spec(x.shape[0]) for x in (q_Xh, k_Xh, v_Xh)] + [cache_spec] * 2,
      out_specs=[stat_spec, stat_spec,
                 pl.BlockSpec((None, None, rows, hd), lambda k, r, p: (p, k, r, 0))],
      out_shape=[jax.ShapeDtypeStruct((num_splits, KV, X), jnp.float32),
                 jax.ShapeDtypeStruct((num_splits, KV, X), jnp.float32),
                 jax.ShapeDtypeStruct((num_splits, KV, X, hd), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      interpret=interpret,
      name='cache_attention',
  )(*scalars, q_Xh, k_Xh, v_Xh, cache_k_LBSKh, cache_v_LBSKh)


def _fold_kernel(end_ref, m_ref, l_ref, o_ref, *out_refs, split: int, group: int,
                 heads: int, num_real: int, cols: int, normalise: bool):
  """One (KV head, row tile, column block) program: its part of the splits' statistics
  folded in position order, `FOLD_GROUP` splits at a time.

  Refs: end_ref int32 scalar, one past the last position any row sees; m_ref, l_ref [P, X]
  and o_ref [P, X, hd], every split's statistics of the KV head's X rows (row x being token
  x // G, query head x % G; the first `num_real` real). `normalise` True: out_refs is the
  attention output [T * heads, hd] (row t * heads + h: token t's head h), zeros in the
  padding rows; False: out_refs are the folded m [FOLD_ROWS], l [FOLD_ROWS] and
  o [FOLD_ROWS, cols].

  A group's splits are loaded at once and merged as one softmax (their maximum, then their
  weighted sums); the groups are merged one after the other. A split holding no position
  below `end` is not read and counts as "nothing seen" (m = -inf, l = 0, o = 0), as is every
  split after a row's own position: its terms are exact zeros, so a row's result depends
  neither on `end` nor on the number of splits, only on its position. Every row is folded in
  a tile of one shape, so in the same order whichever pass it is in.
  """
  kv = pl.program_id(0)
  x_R = pl.program_id(1) * FOLD_ROWS + jnp.arange(FOLD_ROWS, dtype=jnp.int32)
  c_C = pl.program_id(2) * cols + jnp.arange(cols, dtype=jnp.int32)
  real_R = x_R < num_real
  load_x_R = jnp.where(real_R, x_R, 0)  # in bounds; masked off below
  active = lax.div(end_ref[()] + split - 1, split)

  def merge_group(g, stats):
    p_Q = g * FOLD_GROUP + jnp.arange(FOLD_GROUP, dtype=jnp.int32)
    seen_Q = p_Q < active
    p_Q = jnp.where(seen_Q, p_Q, 0)  # in bounds; masked off below
    mask_QR = seen_Q[:, None] & real_R[None, :]
    m_QR = plgpu.load(m_ref.at[p_Q[:, None], load_x_R[None, :]], mask=mask_QR, other=-jnp.inf)
    l_QR = plgpu.load(l_ref.at[p_Q[:, None], load_x_R[None, :]], mask=mask_QR, other=0.0)
    o_QRC = plgpu.load(o_ref.at[p_Q[:, None, None], load_x_R[None, :, None], c_C[None, None, :]],
                       mask=jnp.broadcast_to(mask_QR[:, :, None], (FOLD_GROUP, FOLD_ROWS, cols)),
                       other=0.0)
    m_R = jnp.max(m_QR, axis=0)
    # Exactly 1 at the maximum (also where every split is -inf: no NaN), 0 for -inf.
    w_QR = jnp.where(m_QR == m_R[None, :], 1.0, jnp.exp(m_QR - m_R[None, :]))
    return _merge(stats, (m_R, jnp.sum(l_QR * w_QR, axis=0),
                          jnp.sum(o_QRC * w_QR[:, :, None], axis=0)))

  init = (jnp.full((FOLD_ROWS,), -jnp.inf, jnp.float32), jnp.zeros((FOLD_ROWS,), jnp.float32),
          jnp.zeros((FOLD_ROWS, cols), jnp.float32))
  # A tile of padding rows alone loads nothing (every load masked) and folds to zeros.
  m_R, l_R, o_RC = lax.fori_loop(0, lax.div(active + FOLD_GROUP - 1, FOLD_GROUP), merge_group,
                                 init)
  if not normalise:
    for ref, value in zip(out_refs, (m_R, l_R, o_RC)):
      ref[...] = value
    return
  (out_ref,) = out_refs
  in_out_R = x_R < out_ref.shape[0] // heads * group  # the tile's rows of the chunk's tokens
  # Rows past the output point past its end (a masked store writes nothing there; in
  # interpret mode, where masked rows are written back as they were, one pointing at a real
  # row could undo that row's store).
  row_R = jnp.where(in_out_R, lax.div(x_R, group) * heads + kv * group + lax.rem(x_R, group),
                    out_ref.shape[0])
  out_RC = jnp.where(real_R[:, None], o_RC / l_R[:, None], 0.0)  # padding rows: 0/0 -> 0
  plgpu.store(out_ref.at[row_R[:, None], c_C[None, :]], out_RC.astype(out_ref.dtype),
              mask=jnp.broadcast_to(in_out_R[:, None], (FOLD_ROWS, cols)))


def fold(m_PKX: jax.Array, l_PKX: jax.Array, o_PKXh: jax.Array, end: jax.Array | int, *,
         num_tokens: int, num_heads: int, num_rows: int | None = None, dtype=None,
         interpret: bool = False):
  """`split_stats`' splits folded in position order (see `_fold_kernel`), reading only the
  splits that hold a position below `end`.

  Args:
    m_PKX, l_PKX, o_PKXh: `split_stats`' outputs.
    end: int32 scalar, one past the last position any query sees.
    num_tokens: T, the chunk's tokens.
    num_heads: H, query heads.
    num_rows: the chunk's real tokens, as `split_stats` took them (None: all T).
    dtype: None: return the folded statistics; a dtype: return the normalised attention
      output in it.
    interpret: run the kernel in Pallas's interpret mode (CPU tests).

  Returns:
    The attention output [1, T, H * hd] (`dtype` given; zeros in the rows of tokens from
    `num_rows` on), or (m_KX, l_KX, o_KXh) float32 over the num_rows * G real rows of each
    KV head.
  """
  P, KV, X, hd = o_PKXh.shape
  G = num_heads // KV
  real = (num_tokens if num_rows is None else num_rows) * G
  cols = min(FOLD_COLS, hd)
  stats = pl.BlockSpec((P, None, X), lambda k, r, c: (0, k, 0))
  kernel = functools.partial(_fold_kernel, split=split_size(KV), group=G, heads=num_heads,
                             num_real=real, cols=cols, normalise=dtype is not None)
  in_specs = [pl.BlockSpec((), lambda k, r, c: ()), stats, stats,
              pl.BlockSpec((P, None, X, hd), lambda k, r, c: (0, k, 0, 0))]
  params = plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
  if dtype is not None:  # every row of the output written: the padding rows' tiles too
    out = pl.pallas_call(
        kernel, grid=(KV, pl.cdiv(num_tokens * G, FOLD_ROWS), hd // cols), in_specs=in_specs,
        out_specs=pl.BlockSpec((num_tokens * num_heads, hd), lambda k, r, c: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((num_tokens * num_heads, hd), dtype),
        compiler_params=params, interpret=interpret, name='cache_attention_fold',
    )(_int32(end), m_PKX, l_PKX, o_PKXh)
    return out.reshape(1, num_tokens, num_heads * hd)
  tiles = pl.cdiv(real, FOLD_ROWS)
  stat = pl.BlockSpec((None, FOLD_ROWS), lambda k, r, c: (k, r))
  out = pl.pallas_call(
      kernel, grid=(KV, tiles, hd // cols), in_specs=in_specs,
      out_specs=[stat, stat, pl.BlockSpec((None, FOLD_ROWS, cols), lambda k, r, c: (k, r, c))],
      out_shape=[jax.ShapeDtypeStruct((KV, tiles * FOLD_ROWS), jnp.float32)] * 2 + [
          jax.ShapeDtypeStruct((KV, tiles * FOLD_ROWS, hd), jnp.float32)],
      compiler_params=params, interpret=interpret, name='cache_attention_fold',
  )(_int32(end), m_PKX, l_PKX, o_PKXh)
  return tuple(x[:, :real] for x in out)


def _int32(x: jax.Array | int) -> jax.Array:
  """An int32 scalar, without a conversion where `x` is one already: a Python int that a
  jitted kernel wrapper received is a weakly typed int32, which jax 0.11 converts with a
  no-op `convert` that the kernel inlined by hand would not have (`_traced_once`)."""
  return x if isinstance(x, jax.Array) and x.dtype == jnp.int32 else jnp.asarray(x, jnp.int32)


def _num_heads(q_BTHh: jax.Array, k_BTKh: jax.Array | None, num_kv: int) -> int:
  """H, from the queries, or from a packed q/k/v of one shard (k None)."""
  return q_BTHh.shape[2] if k_BTKh is not None else q_BTHh.shape[3] - 2 * num_kv


# The kernels below are jitted with `inline=True`: a program that calls one per layer (the
# accelerator path's unrolled layers) traces and lowers it once per shape instead of once per
# layer, while the program it builds is unchanged (inlined where it is called), so are its
# numerics. At the SmolLM2 shape that cut tracing and lowering a decoder's GPU programs from
# 6.9 s to 2.5 s (`tests/test_attention_pallas.py` checks the programs are the same).
_traced_once = functools.partial(jax.jit, static_argnames=('interpret',), inline=True)


@functools.partial(_traced_once, static_argnames=('interpret', 'num_rows'))
def cache_attention_pallas(q_BTHh: jax.Array, k_BTKh: jax.Array, v_BTKh: jax.Array,
                           cache_k_LBSKh: jax.Array, cache_v_LBSKh: jax.Array,
                           layer: jax.Array | int, start: jax.Array | int,
                           riders: attention_lib.Riders | None = None, *,
                           num_rows: int | None = None, interpret: bool = False) -> jax.Array:
  """Causal grouped-query attention of a chunk over the cache and itself, fused.

  Same signature, semantics and reduction-order contract as `attention.cache_attention`:
  query t sits at position start + t and sees the cached keys of layer `layer` below
  `start` and the chunk's own keys from `start` on; riders (`attention.Riders`) see the
  cache below their position and their own key. The cache is only read.

  Args:
    q_BTHh: roped queries of the chunk (B = 1; T <= 64 or so; hd a power of two >= 16), or
      q, k and v packed (`attention.split_packed`, one shard), read in place.
    k_BTKh: the chunk's roped keys (None when packed).
    v_BTKh: the chunk's values (None when packed).
    cache_k_LBSKh: every layer's cached keys, in the queries' dtype; S a multiple of
      `attention.ATTENTION_BLOCK`.
    cache_v_LBSKh: every layer's cached values.
    layer: which layer's cache to read (a Python int or a traced int32 scalar).
    start: int32 scalar, the chunk's first position (start + T <= S).
    riders: optional rows of the chunk that are riders, not tokens.
    num_rows: optional, the chunk's real rows (`attention.cache_attention`): the kernel
      neither loads nor computes the others, and returns zeros there.
    interpret: run the kernel in Pallas's interpret mode (CPU tests).

  Returns:
    The attention output [B, T, H*hd] in the queries' dtype.
  """
  assert cache_k_LBSKh.shape[2] % attention_lib.ATTENTION_BLOCK == 0, cache_k_LBSKh.shape
  T = q_BTHh.shape[1]  # batch 1: `split_stats` checks it
  H = _num_heads(q_BTHh, k_BTKh, cache_k_LBSKh.shape[3])
  n = T if num_rows is None else num_rows
  stats = split_stats(q_BTHh, k_BTKh, v_BTKh, cache_k_LBSKh, cache_v_LBSKh, layer, start,
                      riders, num_rows=n, interpret=interpret)
  return fold(*stats, start + n, num_tokens=T, num_heads=H, num_rows=n, dtype=q_BTHh.dtype,
              interpret=interpret)


@_traced_once
def prefix_attention_pallas(q_BTHh: jax.Array, k_BTKh: jax.Array, v_BTKh: jax.Array,
                            cache_k_LBSKh: jax.Array, cache_v_LBSKh: jax.Array,
                            layer: jax.Array | int, pos: jax.Array | int, *,
                            interpret: bool = False) -> jax.Array:
  """`attention.prefix_attention`, fused: T queries at position `pos`, each seeing the
  cached keys below `pos` and its own key only (the CLaSp DP's pseudo-tokens).

  The kernel reduces the cached prefix for every query; each query's own key joins that
  softmax outside it. Its numerics decide no committed token, so it keeps no contract with
  the reference beyond closeness. Args and returns as `cache_attention_pallas`, `pos` for
  `start`.
  """
  if k_BTKh is None:  # packed (its own keys are merged outside the kernel: three arrays)
    q_BTHh, k_BTKh, v_BTKh = attention_lib.split_packed(q_BTHh, cache_k_LBSKh.shape[3])
  B, T, H, hd = q_BTHh.shape
  KV = k_BTKh.shape[2]
  G = H // KV
  stats = split_stats(q_BTHh, k_BTKh, v_BTKh, cache_k_LBSKh, cache_v_LBSKh, layer, pos,
                      own_keys=False, interpret=interpret)
  m_KX, l_KX, o_KXh = fold(*stats, pos, num_tokens=T, num_heads=H, interpret=interpret)
  # Row t * G + g of a KV head is token t's query head g: its own key is token t's.
  q_KXh = _rows_by_kv_head(q_BTHh, KV)
  k_KXh, v_KXh = (jnp.repeat(x[0].transpose(1, 0, 2), G, axis=1).astype(jnp.float32)
                  for x in (k_BTKh, v_BTKh))
  s_KX = jnp.einsum('kxh,kxh->kx', q_KXh.astype(jnp.float32), k_KXh,
                    precision=lax.Precision.HIGHEST) / math.sqrt(hd)
  _, l_KX, o_KXh = _merge((m_KX, l_KX, o_KXh), (s_KX, jnp.ones_like(s_KX), v_KXh))
  return _normalise(l_KX, o_KXh, B, T, H, q_BTHh.dtype)


def _rows_by_kv_head(q_BTHh: jax.Array, num_kv: int) -> jax.Array:
  """Queries [KV, T * G, hd] as the kernel holds them: row t * G + g of a KV head is token
  t's query head g (batch 1)."""
  _, T, H, hd = q_BTHh.shape
  G = H // num_kv
  return q_BTHh[0].reshape(T, num_kv, G, hd).transpose(1, 0, 2, 3).reshape(num_kv, T * G, hd)


def _merge(a, b):
  """Two online-softmax statistics (m, l, o) over disjoint keys merged into one; one whose
  keys a query sees none of (m = -inf, l = 0, o = 0) adds exact zeros."""
  (m_a, l_a, o_a), (m_b, l_b, o_b) = a, b
  m = jnp.maximum(m_a, m_b)
  alpha = jnp.where(m == m_a, 1.0, jnp.exp(m_a - m))
  beta = jnp.where(m == m_b, 1.0, jnp.exp(m_b - m))
  return m, l_a * alpha + l_b * beta, o_a * alpha[..., None] + o_b * beta[..., None]


def _normalise(l_KX, o_KXh, B, T, H, dtype):
  """The attention output [B, T, H*hd] from the folded sums of the T * G rows per KV head."""
  KV, _, hd = o_KXh.shape
  out_KXh = (o_KXh[:, :T * (H // KV)] / l_KX[:, :T * (H // KV), None]).astype(dtype)
  return out_KXh.reshape(KV, T, H // KV, hd).transpose(1, 0, 2, 3).reshape(B, T, H * hd)
