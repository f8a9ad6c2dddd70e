"""The attention of a pass computing its rows apart on a CPU: a hand-written kernel
(`cpu_attention.cc`) beside `attention.row_attention`, the plain `jnp` version it is tested
against.

A decoder whose passes compute each row as a 1-row pass would (`engine.Decoder`'s
`rows_apart`) runs its plain steps 1 row wide and its verify passes 3 rows wide, so a row's
attention must come out the same bits whichever pass it sits in. The kernel computes each query
row on its own, in an order that depends only on the row's position (see the `.cc`), and reads
a block of keys once for a row's query heads; `attention.row_attention` gets the same
independence from XLA only in some programs (a product per row: XLA compiled a row one way
in a 3-row pass and another in a 1-row pass of the stacked layout), and cost a 3-row pass
14-22% more than the batched attention after 400-1500 tokens on a 2-core AMD EPYC
(docs/results/cpu/plain_one_row/). The two round differently: a decoder runs one of them for
all its passes.

It is built with the product kernel (`cpu_product.available`), for float32 and a batch of one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clasp_jax import attention as attention_lib
from clasp_jax import cpu_product

#: The kernel's head dimension is whole vectors of 16 lanes (LLaMA's are 64 or 128).
HEAD_DIM_MULTIPLE = 16


def head_dim_problem(head_dim: int) -> str | None:
  """Why the kernel cannot take heads of `head_dim`, or None where it can."""
  if head_dim % HEAD_DIM_MULTIPLE:
    return (f'the CPU attention kernel takes heads of a multiple of {HEAD_DIM_MULTIPLE}, '
            f'not {head_dim}')
  return None


def row_attention(q_1THh: jax.Array, k_1TKh: jax.Array | None, v_1TKh: jax.Array | None,
                  cache_k_LBSKh: jax.Array, cache_v_LBSKh: jax.Array,
                  layer: jax.Array | int, start: jax.Array,
                  riders: attention_lib.Riders | None = None, *,
                  num_rows: int | None = None) -> jax.Array:
  """`attention.row_attention` by the kernel: each of the chunk's T rows (batch 1) attends as a
  chunk of that row alone would, riders (see `attention.Riders`) as the rows `row_limits`
  describes.

  Args: as `attention.cache_attention`'s; float32, B = 1.

  Returns:
    The attention output [1, T, H*hd], float32.
  """
  if not cpu_product.available():
    raise RuntimeError('the CPU attention kernel was asked for but could not be built')
  if k_1TKh is None:
    q_1THh, k_1TKh, v_1TKh = attention_lib.split_packed(q_1THh, cache_k_LBSKh.shape[3])
  B, T, H, hd = q_1THh.shape
  if B != 1 or cache_k_LBSKh.shape[1] != 1:
    raise ValueError(f'the CPU attention kernel takes a batch of one, got {B}')
  problem = head_dim_problem(hd)
  if problem:
    raise ValueError(problem)
  last_T, own_T = attention_lib.row_limits(T, start, riders)
  own_T = last_T if own_T is None else own_T
  scalar = lambda x: jnp.asarray(x, jnp.int32).reshape(())
  out_THh = jax.ffi.ffi_call(cpu_product.TARGETS['RowAttention'],
                             jax.ShapeDtypeStruct((T, H, hd), jnp.float32))(
      q_1THh[0].astype(jnp.float32), k_1TKh[0].astype(jnp.float32),
      v_1TKh[0].astype(jnp.float32), cache_k_LBSKh, cache_v_LBSKh, scalar(layer),
      scalar(start), last_T.astype(jnp.int32), own_T.astype(jnp.int32))
  return attention_lib.padding_zeroed(out_THh.reshape(1, T, H * hd).astype(q_1THh.dtype),
                                      num_rows)
