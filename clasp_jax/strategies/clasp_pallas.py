"""The CLaSp DP's step between layers for candidates riding a verify pass, as one GPU kernel
(Pallas, Triton lowering): `clasp.next_riders`'s contract.

In a verify pass that carries a band of the DP's table (`clasp.band_ride`), each layer is
followed by the DP's choice for the band's cells. As `jnp` that is a few small kernels a
layer (the candidates' cosines, the choice, the next input written around the real rows),
each latency-bound: at the SmolLM2-135M shape on an H200 they were most of what a round of
CLaSp cost over a static skip set's (docs/results/h200/decode/band_cost/). Here it is one
kernel a layer: a program per chunk row, the riders' programs choosing and every other one
copying its row as it is (bit for bit: the real rows' values never go through arithmetic).

The cosines are summed in another order than `jnp`'s, so a near tie between running and
skipping a layer may be decided the other way: the DP is a heuristic whose choice only steers
the drafts, which verification checks, so the tokens are the same either way.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp



def _num_warps(block: int) -> int:
  """Warps for a program over `block` lanes: 256 lanes a warp, 1 to 8 (as jax's Pallas
  norm kernels choose)."""
  return min(max(block // 256, 1), 8)


def _next_riders_kernel(first_column_ref, layer_ref, x_in_ref, out_ref, edge_ref, h_ref,
                        next_ref, take_ref, *, num_tokens: int, width: int, first_row: int,
                        num_rows: int, block: int, wrap: bool):
  """Program t: chunk row t of the next layer's input (refs flat: row t is [t * width,
  (t + 1) * width)), and for a rider whether its cell skipped the layer (0 elsewhere)."""
  t = pl.program_id(0)
  f = t - first_row  # the rider's index in the band
  rider = (f >= 0) & (f < num_rows)
  col_C = jnp.arange(block, dtype=jnp.int32)
  valid_C = col_C < width
  above = jnp.maximum(t - 1, 0)
  here_C, above_C, own_C = t * width + col_C, above * width + col_C, col_C
  if wrap:
    # Pallas's interpret mode stores a masked lane by writing back what it read there, so
    # the lanes past a row (a width not a power of two) must address in bounds and never
    # this program's row: they wrap into the next row (the first row for the last one). On
    # a GPU a masked lane touches nothing, and the plain offsets keep the loads contiguous,
    # which Triton vectorises (a wrapped offset defeats that).
    total = num_tokens * width
    here_C, above_C, own_C = (lax.rem(here_C, total), lax.rem(above_C, total),
                              lax.rem(own_C, width))
  run_C = plgpu.load(out_ref.at[here_C], mask=valid_C, other=0)
  # Skipping the layer keeps g(i, j - 1): the previous rider's input, or the band's edge.
  prev_C = plgpu.load(x_in_ref.at[above_C], mask=valid_C, other=0)
  edge_C = plgpu.load(edge_ref.at[own_C], mask=valid_C, other=0).astype(prev_C.dtype)
  skip_C = jnp.where(f == 0, edge_C, prev_C)
  h_C = plgpu.load(h_ref.at[own_C], mask=valid_C, other=0).astype(jnp.float32)

  def closeness(v_C):  # cosine to h_{i+1} times |h|, as `clasp._choose`
    v_C = v_C.astype(jnp.float32)
    return jnp.sum(v_C * h_C) / (jnp.sqrt(jnp.sum(v_C * v_C)) + 1e-30)

  # j >= i + 1 means every layer so far is skipped: the only way there is to skip.
  take = rider & ((closeness(skip_C) >= closeness(run_C))
                  | (first_column_ref[()] + f >= layer_ref[()] + 1))
  plgpu.store(next_ref.at[here_C], jnp.where(take, skip_C.astype(run_C.dtype), run_C),
              mask=valid_C)
  take_ref[...] = take.astype(jnp.int32)


def next_riders_pallas(x_in_BTD: jax.Array, out_BTD: jax.Array, edge_D: jax.Array,
                       h_D: jax.Array, first_column: jax.Array, layer, *, rows: slice,
                       interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """`clasp.next_riders` in one kernel (see the module docstring); `interpret`: run it in
  Pallas's interpret mode (CPU tests)."""
  B, T, D = out_BTD.shape
  assert B == 1, f'batch 1 only, got {B}'
  assert x_in_BTD.shape == out_BTD.shape, (x_in_BTD.shape, out_BTD.shape)
  scalars = tuple(jnp.asarray(x, jnp.int32) for x in (first_column, layer))
  block = pl.next_power_of_2(D)
  scalar_spec = pl.BlockSpec((), lambda t: ())
  def whole_spec(n):
    return pl.BlockSpec((n,), lambda t: (0,))
  next_X, take_T = pl.pallas_call(
      functools.partial(_next_riders_kernel, num_tokens=T, width=D, first_row=rows.start,
                        num_rows=rows.stop - rows.start, block=block, wrap=interpret),
      grid=(T,),
      in_specs=[scalar_spec] * 2 + [whole_spec(T * D)] * 2 + [whole_spec(D)] * 2,
      out_specs=[whole_spec(T * D), pl.BlockSpec((None,), lambda t: (t,))],
      out_shape=[jax.ShapeDtypeStruct((T * D,), out_BTD.dtype),
                 jax.ShapeDtypeStruct((T,), jnp.int32)],
      compiler_params=plgpu.CompilerParams(num_warps=_num_warps(block), num_stages=1),
      interpret=interpret,
      name='next_riders',
  )(*scalars, x_in_BTD.reshape(-1), out_BTD.reshape(-1), edge_D, h_D)
  return next_X.reshape(B, T, D), take_T[rows] > 0
