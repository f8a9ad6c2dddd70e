"""Drafting with the model itself, some of its layers skipped (Self-SD, CLaSp), and with the
context first (prompt lookup).

The draft runs the skip set in `state.skip_L` for up to K tokens and stops early, on device,
once a drafted token's top-1 probability falls below the draft-exit threshold (DET). That
last, uncertain token is still verified: the verify pass has K+1 slots either way.

With `lookup` on, a round first looks for an n-gram match of its last tokens in the context
(prompt lookup): a match gives the round its drafts for free (no model runs), and only a round
without one drafts with layers skipped. (A policy's stretches without layer-skip drafts run
prompt lookup's own rounds: `lookup_strategy`.) Copied spans are long where text repeats its
context (code, summaries, retrieval), layer-skip drafts cover the rest; both are verified by
the same pass, so the output stays plain decoding's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax import model as model_lib
from clasp_jax import sampling as sampling_lib
from clasp_jax.config import LlamaConfig
from clasp_jax.strategies import pld
from clasp_jax.strategies.base import PLAIN, SKIP, Drafts


def validate_draft_settings(num_draft_tokens: int, draft_exit_threshold: float) -> None:
  """Raises ValueError for K < 1 or a threshold outside [0, 1]."""
  if num_draft_tokens < 1:
    raise ValueError(f'num_draft_tokens (K) must be >= 1, got {num_draft_tokens}')
  if not 0.0 <= draft_exit_threshold <= 1.0:
    raise ValueError(f'draft_exit_threshold must be in [0, 1], got {draft_exit_threshold}')


def draft_with_skip(params, config, state, sampling, key, attention, *, num_draft_tokens: int,
                    draft_exit_threshold: float, enabled: jax.Array | bool = True):
  """Drafts up to K tokens with the layers in `state.skip_L` skipped.

  Runs only the active layers' weights when the engine passes them as
  `params['draft_layers']` (`Decoder.drafts_active_layers`: the fast path off the CPU), else
  every layer with a `lax.cond` each; both compute the same tokens. With `enabled` False
  (traced) it runs no step and proposes nothing: the drafting loop's trip count, not a branch,
  so no buffer is copied.

  Returns:
    (Drafts, state) where the state's cache holds the drafts' rows of the layers that ran;
    its length is unchanged.
  """
  K, V = num_draft_tokens, config.vocab_size
  length = state.cache.length
  last = state.tokens_N[state.num_tokens - 1]
  q_KV = None if sampling.greedy else jnp.zeros((K, V), jnp.float32)

  if 'draft_layers' not in params:  # one lax.cond per layer
    run = dict(params=params, skip_L=state.skip_L, attention=attention)
  else:  # the active layers alone
    run = dict(params=dict(params, layers=params['draft_layers']),
               layer_ids_A=state.draft_ids_A, attention=attention)

  def step(carry):
    k, token, cache, _, tokens_K, q_KV, key = carry
    out = model_lib.forward(config=config, tokens_BT=token.reshape(1, 1), cache=cache, **run)
    logits_V = out.logits_BPV[0, 0]
    if sampling.greedy:
      draft = jnp.argmax(logits_V).astype(jnp.int32)
      confidence = jnp.max(jax.nn.softmax(logits_V))
    else:
      key, sub = jax.random.split(key)
      probs_V = sampling_lib.probabilities(logits_V, sampling)
      draft = sampling_lib.sample(sub, probs_V)
      confidence = jnp.max(probs_V)
      q_KV = q_KV.at[k].set(probs_V)
    stop = confidence < draft_exit_threshold
    return k + 1, draft, out.cache, stop, tokens_K.at[k].set(draft), q_KV, key

  def more(carry):
    k, stop = carry[0], carry[3]
    return (k < K) & (k < state.draft_limit) & ~stop

  init = (jnp.zeros((), jnp.int32), last, state.cache, ~jnp.asarray(enabled),
          jnp.zeros((K,), jnp.int32), q_KV, key)
  count, _, cache, _, tokens_K, q_KV, _ = jax.lax.while_loop(more, step, init)
  source = jnp.where(count > 0, SKIP, PLAIN).astype(jnp.int32)
  return (Drafts(tokens_K=tokens_K, count=count, q_KV=q_KV, source=source),
          state.replace(cache=cache.rollback(length)))


class LayerSkipDrafting:
  """Mixin: `propose` drafts with the model itself, the layers in `state.skip_L` skipped,
  after prompt lookup when the strategy's `lookup` is on (see the module docstring).

  For strategy dataclasses with `num_draft_tokens` (K) and `draft_exit_threshold` (DET), and
  optionally `lookup` (prompt lookup first, up to K copied drafts).
  """

  skips_layers = True
  lookup = False

  @property
  def lookup_strategy(self):
    if not self.lookup:
      return None
    return pld.PromptLookup(num_draft_tokens=self.num_draft_tokens)

  def validate_drafting(self) -> None:
    validate_draft_settings(self.num_draft_tokens, self.draft_exit_threshold)

  def propose(self, params, config, state, sampling, key, attention):
    if not self.lookup:
      return draft_with_skip(params, config, state, sampling, key, attention,
                             num_draft_tokens=self.num_draft_tokens,
                             draft_exit_threshold=self.draft_exit_threshold)
    copied, state = self.lookup_strategy.propose(params, config, state, sampling, key, attention)
    found = copied.count > 0
    skipped, state = draft_with_skip(params, config, state, sampling, key, attention,
                                     num_draft_tokens=self.num_draft_tokens,
                                     draft_exit_threshold=self.draft_exit_threshold,
                                     enabled=~found)
    return jax.tree.map(lambda c, s: jnp.where(found, c, s), copied, skipped), state


def evenly_spaced_skip_set(config: LlamaConfig, num_skip: int) -> tuple[int, ...]:
  """A static skip set of M layers spread evenly, never the first or last layer."""
  inner = range(1, config.num_layers - 1)
  if num_skip > len(inner):
    raise ValueError(f'cannot spread {num_skip} skipped layers over {len(inner)} inner layers')
  step = len(inner) / max(num_skip, 1)
  return tuple(inner[int(i * step + step / 2)] for i in range(num_skip))


def skip_vector(config, layers) -> jax.Array:
  """bool[L] with True at the given layer indices."""
  skip_L = np.zeros((config.num_layers,), bool)
  skip_L[list(layers)] = True
  return jnp.asarray(skip_L)
