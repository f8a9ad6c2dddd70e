"""CLaSp: in-context layer skipping chosen by a dynamic programme (Chen et al., ACL 2025).

After a verify pass, the L+1 pre-norm hidden states h_0..h_L of the last accepted token say
what the full model computed there. The DP (Algorithm 1) looks for the M layers whose
skipping keeps the hidden state closest to h_L: g(i, j) is the best state after the first i
layers with j of them skipped, D(i, j) its cosine to h_i. For every j in parallel it keeps the
better of running layer i-1 on g(i-1, j) and skipping it from g(i-1, j-1). All M candidates
go through a layer in one call, as pseudo-tokens at the target's position that attend to the
cached prefix and to themselves only (`model.pseudo_token_layer`); nothing is written to the
cache. The choices are backtracked from (L, M) into a skip set of exactly M layers.

The same table can be filled inside verify passes instead of by a pass of its own
(`band_ride`, `finish_band`): the candidates ride in the verify pass's spare rows, a band of
columns per pass, so the DP reads no weight the verify pass does not read anyway.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax import attention as attention_lib
from clasp_jax import model as model_lib
from clasp_jax.state import SearchState
from clasp_jax.strategies import layer_skip
from clasp_jax.strategies.base import Strategy


def _choose(run_XD: jax.Array, skip_XD: jax.Array, h_D: jax.Array, j_X: jax.Array,
            i) -> tuple[jax.Array, jax.Array]:
  """One layer i of Algorithm 1 for columns j_X: whether each cell skips the layer (the
  skipped state is at least as close to h_{i+1}, by cosine, as the run one) and the states
  it keeps."""
  # Both candidates' cosines in one product and one norm (float32); h's own norm, a factor
  # common to both, does not change which is closer and is left out.
  both_2XD = jnp.stack([skip_XD.astype(jnp.float32), run_XD.astype(jnp.float32)])
  close_2X = (both_2XD @ h_D.astype(jnp.float32)) / (jnp.linalg.norm(both_2XD, axis=-1) + 1e-30)
  # j >= i + 1 means every layer so far is skipped: the only way there is to skip.
  take_skip_X = (close_2X[0] >= close_2X[1]) | (j_X >= i + 1)
  return take_skip_X, jnp.where(take_skip_X[:, None], skip_XD, run_XD.astype(skip_XD.dtype))


def clasp_dp_table(params, config, cache, hidden_LD: jax.Array, max_skip: int, *,
                   attention=attention_lib.prefix_attention) -> jax.Array:
  """The DP's choice table: bool[L, max_skip + 1], True where cell (layer l, j) skipped l.

  Cell j of the table does not depend on how many layers are finally skipped, so one table
  answers every M <= max_skip (see `backtrack`).

  Args:
    params: the params pytree (stacked or per layer).
    config: the model config.
    cache: the KV cache; its last valid row is the target token's, whose prefix
      [0, length - 1) the pseudo-tokens attend to.
    hidden_LD: [L+1, D] the target token's pre-norm hidden states (h_0 = embedding output).
    max_skip: the largest M asked for, static.
    attention: the pseudo-tokens' attention (`attention.prefix_attention` or a kernel with
      its signature; see `engine.resolve_attention`).
  """
  M = max_skip
  pos = cache.length - 1
  j_M = jnp.arange(1, M + 1)

  def layer_step(i, lp, g_JD):  # g_JD[j] = g(i, j) for j = 0..M
    run_MD = model_lib.pseudo_token_layer(lp, config, g_JD[1:], pos, cache, i, attention)
    h_D = hidden_LD[i + 1]
    take_skip_M, g_MD = _choose(run_MD, g_JD[:-1], h_D, j_M, i)
    choice_J = jnp.concatenate([jnp.zeros((1,), bool), take_skip_M])
    return jnp.concatenate([h_D[None], g_MD], axis=0), choice_J

  g_JD = jnp.broadcast_to(hidden_LD[0], (M + 1, hidden_LD.shape[-1]))
  _, choice_LJ = model_lib.scan_layers(params, layer_step, g_JD)
  return choice_LJ


def backtrack(choice_LJ: jax.Array, num_skip: jax.Array | int) -> jax.Array:
  """The skip set bool[L] of exactly `num_skip` layers, read back from cell (L, num_skip).

  The loop is unrolled: a GPU runs a rolled loop's L iterations one launch and one read-back
  of its condition at a time (at L = 32 on an H200, 1.2 ms as a call of its own; unrolled,
  0.26 ms).
  """
  L = choice_LJ.shape[0]

  def step(t, carry):
    j, skip_L = carry
    i = L - 1 - t
    skipped = choice_LJ[i, j]
    return j - skipped.astype(jnp.int32), skip_L.at[i].set(skipped)

  _, skip_L = jax.lax.fori_loop(0, L, step, (jnp.asarray(num_skip, jnp.int32),
                                             jnp.zeros((L,), bool)), unroll=True)
  return skip_L


def backtrack_host(choice_LJ: np.ndarray, num_skip: int) -> np.ndarray:
  """`backtrack` on the host, for a table already read back: bool[L]."""
  skip_L = np.zeros((choice_LJ.shape[0],), bool)
  j = num_skip
  for i in reversed(range(choice_LJ.shape[0])):
    skip_L[i] = choice_LJ[i, j]
    j -= int(skip_L[i])
  return skip_L


def empty_search(config, num_columns: int, dtype) -> SearchState:
  """A search with no table yet, as host arrays: J = `num_columns` (the largest M + 1)."""
  L, D = config.num_layers, config.hidden_size
  return SearchState(
      band=np.zeros((), np.int32), pos=np.zeros((), np.int32),
      target_LD=np.zeros((L + 1, D), dtype), edge_LD=np.zeros((L + 1, D), dtype),
      table_LJ=np.zeros((L, num_columns), bool), ready_LJ=np.zeros((L, num_columns), bool),
      completed=np.zeros((), np.int32))


def next_riders(x_in_BTD: jax.Array, out_BTD: jax.Array, edge_D: jax.Array, h_D: jax.Array,
                first_column: jax.Array, layer, *, rows: slice) -> tuple[jax.Array, jax.Array]:
  """One layer i of Algorithm 1 for a band of columns riding in a pass's rows (`band_ride`):
  the next layer's input and which cells skipped layer i.

  Args:
    x_in_BTD: layer i's input; its rows `rows` hold g(i, j) for the band's F columns j.
    out_BTD: layer i's output (the riders' rows: layer i run on g(i, j)).
    edge_D: g(i, j - 1) of the band's first column (the previous band's last).
    h_D: h_{i+1}, the target's state after layer i.
    first_column: int32 scalar, the band's first column j.
    layer: i (an int or an int32 scalar).
    rows: the riders' chunk rows (batch 1).

  Returns:
    out_BTD with rows `rows` replaced by g(i + 1, j), and take_F, whether each cell skipped
    layer i.
  """
  g_FD = x_in_BTD[0, rows]
  skip_FD = jnp.concatenate([edge_D[None].astype(g_FD.dtype), g_FD[:-1]])
  j_F = first_column + jnp.arange(g_FD.shape[0])
  take_F, g_FD = _choose(out_BTD[0, rows], skip_FD, h_D, j_F, layer)
  return model_lib.replace_rows(out_BTD, rows, g_FD), take_F


def band_ride(search: SearchState, target_LD: jax.Array, cache_length: jax.Array, *,
              first_row: int, num_rows: int,
              choose=next_riders) -> tuple[SearchState, model_lib.Ride]:
  """The next band of the DP's table, as riders of a verify pass (`model.Ride`).

  At band 0 a new table starts, for the last token in the cache (position
  `cache_length - 1`, hidden states `target_LD`: the token the standalone DP would take now).
  The band's F = `num_rows` candidates are columns j = band * F + 1 ... of Algorithm 1:
  entering layer i they hold g(i, j); after it, each keeps the better of its output and
  g(i, j - 1) (layer i skipped), the band's first column taking g(i, j - 1) from `edge_LD`.
  `choose` computes that per layer: `next_riders` or a kernel with its signature
  (`clasp_pallas.next_riders_pallas`).

  Returns:
    The search (its target set when a table starts) and the ride; `finish_band` takes the
    ride's per-layer outputs.
  """
  new = search.band == 0
  search = search.replace(pos=jnp.where(new, cache_length - 1, search.pos),
                          target_LD=jnp.where(new, target_LD, search.target_LD),
                          edge_LD=jnp.where(new, target_LD, search.edge_LD))
  first_column = search.band * num_rows + 1
  h_LD, edge_LD = search.target_LD, search.edge_LD

  def after(i, rows, x_in_BTD, out_BTD):  # rows of x_in hold g(i, j), of the result g(i + 1, j)
    next_BTD, take_skip_F = choose(x_in_BTD, out_BTD, edge_LD[i], h_LD[i + 1], first_column,
                                   i, rows=rows)
    return next_BTD, (take_skip_F, next_BTD[0, rows.stop - 1])

  init_FD = jnp.broadcast_to(h_LD[0], (num_rows, h_LD.shape[-1]))
  return search, model_lib.Ride(first_row=first_row, pos=search.pos, init_FD=init_FD,
                                after=after)


def finish_band(search: SearchState, ride_ys) -> SearchState:
  """The search after a band's verify pass: its columns in the table, the next band's
  edge, and the table made ready when it is complete."""
  take_LF, last_LD = ride_ys
  F = take_LF.shape[1]
  J = search.table_LJ.shape[1]
  table_LJ = search.table_LJ.at[:, search.band * F + 1 + jnp.arange(F)].set(take_LF,
                                                                            mode='drop')
  complete = (search.band + 1) * F >= J - 1
  return search.replace(
      band=jnp.where(complete, 0, search.band + 1),
      edge_LD=jnp.concatenate([search.target_LD[:1], last_LD]),
      table_LJ=table_LJ, ready_LJ=jnp.where(complete, table_LJ, search.ready_LJ),
      completed=search.completed + complete.astype(jnp.int32))


def clasp_dp(params, config, cache, hidden_LD: jax.Array, num_skip: int, *,
             attention=attention_lib.prefix_attention) -> jax.Array:
  """Algorithm 1: the skip set bool[L] of exactly `num_skip` (static) layers that best
  preserves h_L. See `clasp_dp_table` for the arguments."""
  if num_skip == 0:
    return jnp.zeros((config.num_layers,), bool)
  table_LJ = clasp_dp_table(params, config, cache, hidden_LD, num_skip, attention=attention)
  return backtrack(table_LJ, num_skip)


@dataclasses.dataclass(frozen=True)
class Clasp(layer_skip.LayerSkipDrafting, Strategy):
  """Self-speculative decoding whose skip set the DP re-chooses every `loi` rounds.

  Attributes:
    num_skip: M, the number of skipped layers (0 <= M < L).
    num_draft_tokens: K, the most drafts per round.
    draft_exit_threshold: DET, stop drafting below this top-1 probability.
    loi: layer-optimisation interval, in verify rounds (rounds with a lookup match, which need
      no skip set, not counted).
    lookup: take a round's K drafts from the context when it has an n-gram match (prompt
      lookup), drafting with layers skipped only otherwise; False is the paper's CLaSp.
    dp_in_verify: fill the DP's table inside the verify passes, in the rows they pad, a
      band of columns per pass (`band_ride`), and refresh from the newest complete table;
      False: the DP as a pass of its own at every refresh (the paper's). Either way drafts
      are verified, so the tokens are the same; the in-pass DP costs no weight reading of
      its own, and its table is up to a few rounds older.
  """

  num_skip: int = 4
  num_draft_tokens: int = 8
  draft_exit_threshold: float = 0.7
  loi: int = 1
  lookup: bool = True
  dp_in_verify: bool = True
  reads_hidden_states = True  # the DP's input

  @property
  def name(self) -> str:
    return 'clasp'

  def validate(self, config):
    self.validate_drafting()
    if not 0 <= self.num_skip < config.num_layers:
      raise ValueError(f'skip_layers (M) must be in [0, L) = [0, {config.num_layers}), '
                       f'got {self.num_skip}')
    if self.loi < 1:
      raise ValueError(f'loi must be >= 1, got {self.loi}')

  def search_columns(self, config):
    del config
    return self.num_skip + 1 if self.dp_in_verify and self.num_skip else 0

  def refresh(self, params, config, state, num_skip, attention=attention_lib.prefix_attention):
    del num_skip  # always self.num_skip
    return clasp_dp(params, config, state.cache, state.target_hidden_LD, self.num_skip,
                    attention=attention)
