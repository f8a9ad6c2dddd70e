"""Sampling: the filters, and speculative sampling's exactness (chi-square tests)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clasp_jax import sampling
from clasp_jax import strategies
from clasp_jax.engine import Decoder
from clasp_jax.sampling import SamplingConfig
import tiny

# Each chi-square test must not reject at this p-value; with the seeds fixed the tests are
# deterministic, and a wrong acceptance rule (e.g. accepting every draft) fails them by far.
P_VALUE = 1e-3


def _chi_square_p(counts_a, counts_b):
  """p-value of the two-sample chi-square test that two count vectors share a distribution."""
  counts_a, counts_b = np.asarray(counts_a, float), np.asarray(counts_b, float)
  keep = (counts_a + counts_b) > 0
  a, b = counts_a[keep], counts_b[keep]
  total = a + b
  exp_a, exp_b = total * a.sum() / total.sum(), total * b.sum() / total.sum()
  stat = np.sum((a - exp_a) ** 2 / exp_a) + np.sum((b - exp_b) ** 2 / exp_b)
  dof = keep.sum() - 1
  return float(jax.scipy.special.gammaincc(dof / 2, stat / 2))


def _goodness_of_fit_p(counts, probs):
  counts, probs = np.asarray(counts, float), np.asarray(probs, float)
  keep = probs > 0
  expected = probs[keep] * counts.sum()
  stat = np.sum((counts[keep] - expected) ** 2 / expected)
  assert counts[~keep].sum() == 0
  return float(jax.scipy.special.gammaincc((keep.sum() - 1) / 2, stat / 2))


def test_top_k_and_top_p_filters():
  logits_V = jnp.log(jnp.array([0.5, 0.2, 0.15, 0.1, 0.05]))
  top_k = sampling.probabilities(logits_V, SamplingConfig(temperature=1.0, top_k=2))
  np.testing.assert_allclose(top_k, [5 / 7, 2 / 7, 0, 0, 0], rtol=1e-5)
  top_p = sampling.probabilities(logits_V, SamplingConfig(temperature=1.0, top_p=0.8))
  np.testing.assert_allclose(top_p, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], rtol=1e-5)
  hot = sampling.probabilities(logits_V, SamplingConfig(temperature=0.5))
  np.testing.assert_allclose(hot, jax.nn.softmax(2 * logits_V), rtol=1e-5)


@pytest.mark.parametrize('config', [SamplingConfig(temperature=1.0),
                                    SamplingConfig(temperature=0.8, top_k=6, top_p=0.9)])
def test_speculative_acceptance_reproduces_p(config):
  """Drafts from q, verified against p: the first committed token is distributed as p_0, and
  after an accepted first draft the next one is distributed as p_1."""
  V, K, N = 8, 3, 200_000
  logits_TV = jax.random.normal(jax.random.key(0), (K + 1, V)) * 1.5
  noise_KV = jax.random.normal(jax.random.key(1), (K, V))
  q_KV = sampling.probabilities(logits_TV[:K] + noise_KV, config)  # a draft close to p
  p_TV = sampling.probabilities(logits_TV, config)

  def one(key):
    key_d, key_a = jax.random.split(key)
    drafts_K = sampling.sample(key_d, q_KV)
    n, nxt = sampling.accept_sampled(key_a, drafts_K, jnp.int32(K), q_KV, logits_TV, config)
    committed_T = jnp.where(jnp.arange(K + 1) < n, jnp.append(drafts_K, nxt), nxt)
    return committed_T[0], committed_T[1], n

  first, second, n = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(2), N))
  first, second, n = map(np.asarray, (first, second, n))
  assert _goodness_of_fit_p(np.bincount(first, minlength=V), p_TV[0]) > P_VALUE
  after_accept = second[n >= 1]
  assert _goodness_of_fit_p(np.bincount(after_accept, minlength=V), p_TV[1]) > P_VALUE
  assert 0 < (n == 0).mean() < 1  # both branches were exercised


@pytest.mark.parametrize('config', [SamplingConfig(),
                                    SamplingConfig(temperature=1.0),
                                    SamplingConfig(temperature=0.8, top_k=6, top_p=0.9)])
def test_acceptance_by_row_equals_acceptance_over_all_rows(config):
  """`accept_*_by_row`, reading row i's logits on demand, commits what `accept_*` does over
  all rows (same key)."""
  V, K, N = 8, 4, 400

  def one(key):
    key_l, key_q, key_d, key_a, key_n = jax.random.split(key, 5)
    logits_TV = jax.random.normal(key_l, (K + 1, V)) * 1.5
    # Drafts that often hold: the argmax of nearly p, or draws from nearly p.
    q_KV = sampling.probabilities(logits_TV[:K] + 0.3 * jax.random.normal(key_q, (K, V)),
                                  SamplingConfig(temperature=1.0))
    drafts_K = (jnp.argmax(q_KV, axis=-1) if config.greedy else sampling.sample(key_d, q_KV))
    num_drafts = jax.random.randint(key_n, (), 0, K + 1)

    def row(i):
      return logits_TV[i]

    if config.greedy:
      want = sampling.accept_greedy(drafts_K, num_drafts, logits_TV)
      got = sampling.accept_greedy_by_row(drafts_K, num_drafts, row)
    else:
      want = sampling.accept_sampled(key_a, drafts_K, num_drafts, q_KV, logits_TV, config)
      got = sampling.accept_sampled_by_row(key_a, drafts_K, num_drafts, q_KV, row, config)
    return want, got, num_drafts

  (n_want, next_want), (n_got, next_got), num_drafts = jax.jit(jax.vmap(one))(
      jax.random.split(jax.random.key(3), N))
  np.testing.assert_array_equal(n_got, n_want)
  np.testing.assert_array_equal(next_got, next_want)
  assert 0 < np.mean(np.asarray(n_want) == np.asarray(num_drafts)) < 1  # both endings ran


def test_acceptance_by_row_stops_at_the_first_rejection():
  """The rows after the first rejection are never computed: row 2 rejects here, so rows 3
  and 4 are not read (a callback counts the rows read)."""
  V, K = 5, 4
  logits_TV = jnp.eye(K + 1, V) * 3  # row i's argmax is token i
  drafts_K = jnp.array([0, 1, 4, 3], jnp.int32)  # rows 0 and 1 hold, row 2 does not
  read = []

  def row(i):
    jax.debug.callback(lambda i: read.append(int(i)), i, ordered=True)
    return logits_TV[i]

  n, next_token = jax.jit(lambda: sampling.accept_greedy_by_row(drafts_K, jnp.int32(K), row))()
  jax.effects_barrier()
  assert (int(n), int(next_token), read) == (2, 2, [0, 1, 2])


def test_clasp_sampling_matches_plain_sampling():
  """End to end on a tiny model: the third generated token has the same distribution under
  CLaSp speculative sampling as under plain sampling (over many seeds)."""
  config = tiny.tiny_config(vocab_size=12, eos_token_ids=())
  params = tiny.tiny_params(config, scale=0.15)
  temp = SamplingConfig(temperature=1.0)
  plain = Decoder(params, config, strategies.Vanilla(), temp)
  clasp = Decoder(params, config, strategies.build(
      'clasp', config, skip_layers=2, num_draft_tokens=4, draft_exit_threshold=0.0), temp)
  prompt = [5, 7, 1, 9, 2, 2, 8]
  seeds = range(600)
  counts = []
  accepted = []
  for decoder in (plain, clasp):
    outs = [decoder.generate(prompt, 4, seed=s) for s in seeds]
    counts.append(np.bincount([o.token_ids[2] for o in outs], minlength=config.vocab_size))
    accepted.append(np.mean([o.mean_accepted for o in outs]))
  assert accepted[1] > 1.2  # drafts really were accepted
  assert _chi_square_p(*counts) > P_VALUE
