"""Token selection and speculative acceptance.

Greedy decoding accepts the longest prefix of drafts equal to the full model's argmax, then
the full model's own next token. With temperature > 0, standard speculative sampling
(Leviathan et al. 2023; Chen et al. 2023) accepts draft d with probability min(1, p(d)/q(d)),
resamples a rejection from the normalised residual (p - q)+, and draws the bonus token from p,
so the output distribution is exactly that of plain sampling. Temperature, top-k and top-p
are applied identically to p and q.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen.

  Attributes:
    temperature: 0 for greedy decoding, otherwise the softmax temperature.
    top_k: keep the k most likely tokens (0 = all).
    top_p: keep the smallest set of tokens whose mass reaches top_p (1 = all).
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f'temperature must be >= 0, got {self.temperature}')
    if self.top_k < 0:
      raise ValueError(f'top_k must be >= 0, got {self.top_k}')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'top_p must be in (0, 1], got {self.top_p}')
    if self.greedy and (self.top_k or self.top_p < 1):
      raise ValueError('top_k/top_p need temperature > 0: with temperature 0 decoding is greedy')

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def probabilities(logits_XV: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """The distribution sampling draws from: temperature, then top-k, then top-p. [..., V]."""
  logits_XV = logits_XV.astype(jnp.float32) / sampling.temperature
  if sampling.top_k:
    kth_X1 = jax.lax.top_k(logits_XV, sampling.top_k)[0][..., -1:]
    logits_XV = jnp.where(logits_XV < kth_X1, -jnp.inf, logits_XV)
  probs_XV = jax.nn.softmax(logits_XV, axis=-1)
  if sampling.top_p < 1:
    sorted_XV = jnp.sort(probs_XV, axis=-1)[..., ::-1]
    mass_before_XV = jnp.cumsum(sorted_XV, axis=-1) - sorted_XV
    # The smallest probability still inside the nucleus: every token at least as likely stays.
    cutoff_X1 = jnp.min(jnp.where(mass_before_XV < sampling.top_p, sorted_XV, jnp.inf),
                        axis=-1, keepdims=True)
    probs_XV = jnp.where(probs_XV >= cutoff_X1, probs_XV, 0.0)
    probs_XV = probs_XV / jnp.sum(probs_XV, axis=-1, keepdims=True)
  return probs_XV


def sample(key: jax.Array, probs_XV: jax.Array) -> jax.Array:
  """Draws one token id per row of a probability table. [...]."""
  return jax.random.categorical(key, jnp.log(probs_XV), axis=-1).astype(jnp.int32)


def accept_greedy(drafts_K: jax.Array, num_drafts: jax.Array,
                  logits_TV: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Greedy verification of K padded drafts against the full model's logits [K+1, V].

  Returns:
    (n, next_token): the number of drafts accepted and the full model's token after them.
  """
  K = drafts_K.shape[0]
  target_T = jnp.argmax(logits_TV, axis=-1).astype(jnp.int32)
  ok_K = (drafts_K == target_T[:K]) & (jnp.arange(K) < num_drafts)
  n = jnp.sum(jnp.cumprod(ok_K.astype(jnp.int32)))
  return n, target_T[n]


def accept_sampled(key: jax.Array, drafts_K: jax.Array, num_drafts: jax.Array,
                   q_KV: jax.Array, logits_TV: jax.Array,
                   sampling: SamplingConfig) -> tuple[jax.Array, jax.Array]:
  """Speculative sampling of K padded drafts drawn from q [K, V] against logits [K+1, V].

  Returns:
    (n, next_token): the number of drafts accepted and the token drawn after them (from the
    residual at a rejection, from p when every draft was accepted).
  """
  K = drafts_K.shape[0]
  key_u, key_x = jax.random.split(key)
  p_TV = probabilities(logits_TV, sampling)
  p_K = jnp.take_along_axis(p_TV[:K], drafts_K[:, None], axis=-1)[:, 0]
  q_K = jnp.take_along_axis(q_KV, drafts_K[:, None], axis=-1)[:, 0]
  u_K = jax.random.uniform(key_u, (K,))
  ok_K = (u_K * q_K < p_K) & (jnp.arange(K) < num_drafts)
  n = jnp.sum(jnp.cumprod(ok_K.astype(jnp.int32)))
  q_pad_TV = jnp.concatenate([q_KV, jnp.zeros_like(p_TV[:1])], axis=0)
  return n, _draw_after(key_x, p_TV[n], q_pad_TV[n], n < num_drafts)


def accept_greedy_by_row(drafts_K: jax.Array, num_drafts: jax.Array,
                         row_logits: Callable[[jax.Array], jax.Array]
                         ) -> tuple[jax.Array, jax.Array]:
  """`accept_greedy` reading the full model's logits a row at a time, `row_logits(i)` [V],
  only as far as the drafts hold: the rows past the first rejection are never computed.

  Returns:
    (n, next_token): as `accept_greedy` with the same logits.
  """
  drafts_T = jnp.concatenate([drafts_K, jnp.full((1,), -1, jnp.int32)])  # row K drafts nothing

  def step(carry):
    i, _, _ = carry
    target = jnp.argmax(row_logits(i)).astype(jnp.int32)
    holds = (i < num_drafts) & (drafts_T[i] == target)
    return i + holds.astype(jnp.int32), target, holds

  n, next_token, _ = jax.lax.while_loop(
      lambda carry: carry[2], step, (jnp.int32(0), jnp.int32(0), jnp.bool_(True)))
  return n, next_token


def accept_sampled_by_row(key: jax.Array, drafts_K: jax.Array, num_drafts: jax.Array,
                          q_KV: jax.Array, row_logits: Callable[[jax.Array], jax.Array],
                          sampling: SamplingConfig) -> tuple[jax.Array, jax.Array]:
  """`accept_sampled` reading the full model's logits a row at a time, `row_logits(i)` [V],
  only as far as the drafts hold. Same key, same logits: the same draws.

  Returns:
    (n, next_token): as `accept_sampled`.
  """
  K, V = q_KV.shape
  key_u, key_x = jax.random.split(key)
  u_T = jnp.concatenate([jax.random.uniform(key_u, (K,)), jnp.ones((1,))])
  drafts_T = jnp.concatenate([drafts_K, jnp.zeros((1,), jnp.int32)])
  q_TV = jnp.concatenate([q_KV, jnp.zeros((1, V), q_KV.dtype)])

  def step(carry):
    i, _, _ = carry
    p_V = probabilities(row_logits(i), sampling)
    d = drafts_T[i]
    holds = (i < num_drafts) & (u_T[i] * q_TV[i, d] < p_V[d])
    return i + holds.astype(jnp.int32), p_V, holds

  n, p_V, _ = jax.lax.while_loop(
      lambda carry: carry[2], step, (jnp.int32(0), jnp.zeros((V,), jnp.float32), jnp.bool_(True)))
  return n, _draw_after(key_x, p_V, q_TV[n], n < num_drafts)


def _draw_after(key: jax.Array, p_V: jax.Array, q_V: jax.Array,
                rejected: jax.Array) -> jax.Array:
  """The token after the accepted drafts: from the normalised residual (p - q)+ at a
  rejection, from p when every draft was accepted (or the residual has no mass)."""
  residual_V = jnp.maximum(p_V - q_V, 0.0) * rejected
  mass = jnp.sum(residual_V)
  dist_V = jnp.where(mass > 0, residual_V / jnp.where(mass > 0, mass, 1.0), p_V)
  return sample(key, dist_V)
