"""Prompt lookup decoding: drafts copied from the context after an n-gram match.

The last n committed tokens are searched for earlier in the context (longest n first, latest
match first); the K tokens that followed the match become the drafts. No model runs to draft,
so a round costs one verify pass, whether or not a match was found (a plain step is a pass of
the same width). Training-free and model-free: a fair baseline for CLaSp.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from clasp_jax.strategies.base import LOOKUP, PLAIN, Drafts, Strategy


def lookup(tokens_N: jax.Array, num_tokens: jax.Array,
           ngram: int) -> tuple[jax.Array, jax.Array]:
  """Finds the latest earlier occurrence of the last `ngram` tokens.

  Returns:
    (start, found): the index right after the match, and whether there was one.
  """
  N = tokens_N.shape[0]
  suffix_G = jax.lax.dynamic_slice(tokens_N, (num_tokens - ngram,), (ngram,))
  starts_S = jnp.arange(N - ngram + 1)
  windows_SG = tokens_N[starts_S[:, None] + jnp.arange(ngram)[None]]
  # A match must end before the suffix starts so at least one token follows it.
  ok_S = jnp.all(windows_SG == suffix_G, axis=-1) & (starts_S + ngram < num_tokens)
  ok_S &= starts_S < num_tokens - ngram
  best = jnp.max(jnp.where(ok_S, starts_S, -1))
  return best + ngram, (best >= 0) & (num_tokens > ngram)


@dataclasses.dataclass(frozen=True)
class PromptLookup(Strategy):
  """Drafts by n-gram lookup in the prompt and the text generated so far.

  Attributes:
    num_draft_tokens: K, the most tokens copied per round.
    max_ngram: the longest n-gram tried.
    min_ngram: the shortest n-gram tried.
  """

  num_draft_tokens: int = 10
  max_ngram: int = 3
  min_ngram: int = 1

  @property
  def name(self) -> str:
    return 'pld'

  def validate(self, config):
    if self.num_draft_tokens < 1:
      raise ValueError(f'num_draft_tokens (K) must be >= 1, got {self.num_draft_tokens}')
    if not 1 <= self.min_ngram <= self.max_ngram:
      raise ValueError(f'need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, '
                       f'{self.max_ngram}')

  def propose(self, params, config, state, sampling, key, attention):
    del params, key, attention  # the drafts are copied from the context: no model runs
    K = self.num_draft_tokens
    start, found = jnp.int32(0), jnp.zeros((), bool)
    for ngram in range(self.max_ngram, self.min_ngram - 1, -1):
      s, f = lookup(state.tokens_N, state.num_tokens, ngram)
      start, found = jnp.where(found, start, s), found | f
    tokens_K = jax.lax.dynamic_slice(state.tokens_N, (start,), (K,))
    count = jnp.where(found, jnp.minimum(K, state.num_tokens - start), 0).astype(jnp.int32)
    q_KV = None
    if not sampling.greedy:
      # A copied draft is a point mass: q(d) = 1, so it is accepted with probability p(d).
      q_KV = jax.nn.one_hot(tokens_K, config.vocab_size, dtype=jnp.float32)
    return Drafts(tokens_K=tokens_K, count=count, q_KV=q_KV,
                  source=jnp.where(count > 0, LOOKUP, PLAIN).astype(jnp.int32)), state
