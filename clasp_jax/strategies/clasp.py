"""CLaSp: in-context layer skipping chosen by a dynamic programme (Chen et al., ACL 2025).

After a verify pass, the L+1 pre-norm hidden states h_0..h_L of the last accepted token say
what the full model computed there. The DP (Algorithm 1) looks for the M layers whose
skipping keeps the hidden state closest to h_L: g(i, j) is the best state after the first i
layers with j of them skipped, D(i, j) its cosine to h_i. For every j in parallel it keeps the
better of running layer i-1 on g(i-1, j) and skipping it from g(i-1, j-1). All M candidates
go through a layer in one call, as pseudo-tokens at the target's position that attend to the
cached prefix and to themselves only (`model.pseudo_token_layer`); nothing is written to the
cache. The choices are backtracked from (L, M) into a skip set of exactly M layers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from clasp_jax import attention as attention_lib
from clasp_jax import model as model_lib
from clasp_jax.strategies import layer_skip
from clasp_jax.strategies.base import Strategy


def _cosine(a_MD: jax.Array, b_D: jax.Array) -> jax.Array:
  """Cosine similarity of each row of a to b, in float32. [M]."""
  a_MD, b_D = a_MD.astype(jnp.float32), b_D.astype(jnp.float32)
  num_M = a_MD @ b_D
  return num_M / (jnp.linalg.norm(a_MD, axis=-1) * jnp.linalg.norm(b_D) + 1e-30)


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
    skip_MD = g_JD[:-1]
    h_D = hidden_LD[i + 1]
    # j == i + 1 means every layer so far is skipped: the only way there is to skip.
    take_skip_M = (_cosine(skip_MD, h_D) >= _cosine(run_MD, h_D)) | (j_M >= i + 1)
    g_MD = jnp.where(take_skip_M[:, None], skip_MD, run_MD.astype(g_JD.dtype))
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
  """

  num_skip: int = 4
  num_draft_tokens: int = 8
  draft_exit_threshold: float = 0.7
  loi: int = 1
  lookup: bool = True

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

  def refresh(self, params, config, state, num_skip, attention=attention_lib.prefix_attention):
    del num_skip  # always self.num_skip
    return clasp_dp(params, config, state.cache, state.target_hidden_LD, self.num_skip,
                    attention=attention)
