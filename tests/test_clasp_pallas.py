"""The CLaSp DP's step between layers as one kernel: against `clasp.next_riders`.

The kernel runs natively on a GPU and in Pallas's interpret mode elsewhere (CPU tests).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clasp_jax import engine
from clasp_jax.engine import Decoder
from clasp_jax.strategies import clasp as clasp_lib
from clasp_jax.strategies import layer_skip
from clasp_jax.strategies.base import Segment
from clasp_jax.strategies import clasp_pallas
import tiny

INTERPRET = jax.default_backend() != 'gpu'


@functools.partial(jax.jit, static_argnames=('first_row', 'stop'))
def _kernel_and_reference(x_in_BTD, out_BTD, edge_D, h_D, first_column, layer, first_row, stop):
  rows = slice(first_row, stop)
  args = (x_in_BTD, out_BTD, edge_D, h_D, first_column, layer)
  return (clasp_pallas.next_riders_pallas(*args, rows=rows, interpret=INTERPRET),
          clasp_lib.next_riders(*args, rows=rows))


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize('D,T,rows', [(576, 16, slice(9, 16)), (64, 8, slice(3, 6))])
@pytest.mark.parametrize('first_column,layer', [(1, 5), (4, 2)])
def test_kernel_matches_next_riders(dtype, D, T, rows, first_column, layer):
  """The same next input and choices as `jnp` (random states, so no near ties); the real
  rows, and the rows past the riders, copied bit for bit. D = 576 is not a power of two (the
  kernel's block is wider, masked). With `first_column` past the layer every cell must skip."""
  rng = np.random.default_rng(D + T + layer)
  def normal(*shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
  x_in_BTD, out_BTD = normal(1, T, D), normal(1, T, D)
  h_D = normal(D)
  # Some skipped states closer to h than the run ones, some farther.
  edge_D = (h_D.astype(jnp.float32) + 0.1 * normal(D).astype(jnp.float32)).astype(dtype)
  x_in_BTD = x_in_BTD.at[0, rows.start + 1].set(h_D)
  (next_k, take_k), (next_r, take_r) = _kernel_and_reference(
      x_in_BTD, out_BTD, edge_D, h_D, jnp.int32(first_column), jnp.int32(layer), rows.start,
      rows.stop)
  chex.assert_trees_all_equal(take_k, take_r)
  chex.assert_trees_all_equal(next_k, next_r)
  if first_column >= layer + 1:
    assert bool(jnp.all(take_k))
  else:
    assert bool(jnp.any(take_k)) and not bool(jnp.all(take_k))
  np.testing.assert_array_equal(np.asarray(next_k[0, :rows.start], np.float32),
                                np.asarray(out_BTD[0, :rows.start], np.float32))
  np.testing.assert_array_equal(np.asarray(next_k[0, rows.stop:], np.float32),
                                np.asarray(out_BTD[0, rows.stop:], np.float32))


@pytest.mark.parametrize('num_skip,num_draft_tokens,pass_width', [
    (3, 4, 16),  # 11 spare rows: one band
    (5, 5, 8),   # 2 spare rows: three bands, each but the first starting from an edge
])
def test_verify_passes_with_the_kernel_fill_the_standalone_dp_table(
    num_skip, num_draft_tokens, pass_width, monkeypatch):
  """The accelerator path's verify passes, their riders choosing with the kernel, complete
  the table the standalone DP (`jnp`, a pass of its own) computes for the same target."""
  monkeypatch.setattr(engine, 'resolve_rider_choice', lambda name, mesh=None: functools.partial(
      clasp_pallas.next_riders_pallas, interpret=INTERPRET))
  config = tiny.tiny_config(eos_token_ids=())
  params = tiny.tiny_params(config, seed=2)
  strategy = clasp_lib.Clasp(num_skip=num_skip, num_draft_tokens=num_draft_tokens,
                             draft_exit_threshold=0.0, lookup=False)
  decoder = Decoder(params, config, strategy, pass_width=pass_width, fast_path=True,
                    attention='xla')
  state = decoder.start(tiny.prompts(config, 1)[0], 64)
  table_LJ = np.asarray(clasp_lib.clasp_dp_table(decoder.params, config, state.cache,
                                                 state.target_hidden_LD, num_skip))
  state = decoder.put_skip_set(state, layer_skip.skip_vector(config, (1, 3)))
  while int(state.search.completed) == 0:
    state, _ = decoder.run_segment(state, Segment(draft=True, rounds=1), 64)
  np.testing.assert_array_equal(np.asarray(state.search.ready_LJ), table_LJ)
