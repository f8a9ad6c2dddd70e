"""ConfLayers: a skip set searched from per-layer confidence (Amer et al., arXiv 2604.14612).

Drafting, verification and statistics are CLaSp's (`layer_skip.draft_with_skip`); only the
skip set is chosen differently, by a host-side search:

1. Confidence. One full forward over the last W generated tokens (fewer at the start of a
   generation: padded to a static W and masked) gives, for each layer i, the attention output
   and the MLP output before their residual adds (`model.sublayer_stats`). The confidence of
   a sub-layer output m (T x D) is 1 - mean_t H(softmax(m_t)) / log D, entropy over the hidden
   dimension, and c_i = conf(attention_i) + conf(MLP_i). The window's tokens sit at their real
   positions and attend read-only to the real KV cache of what precedes them, so they see the
   context they were generated in; the cache is left untouched. (The published code runs the
   window after a copy of the prompt-only cache; with at most W generated tokens the two agree.)
2. Selection (`select_skip_layers`, NumPy on the L - 2 inner layers: the first and last layer
   are never candidates). The confidences are z-normalised; g2 = gradient(gradient(z))
   (`np.gradient`) is mapped affinely so that its mean goes to 0.5 and its farther extreme to
   0 or 1 (`normalise_to_mean_half`); count is the length of g2's leading run of equal values.
   Inner layer k (layer k + 1) gets the window w_k = 2 + int(5 * count * g2_k * (k + 1) / L):
   its neighbours within w_k // 2 on either side, itself excluded, clipped at the ends. It is
   skipped when z_k < mean - lambda * std of those neighbours (population std).
3. Lambda (`select_in_band`) starts at `initial_lambda` and moves by `lambda_step` until the
   skip ratio (skipped / (L - 2)) lies in [r, r + band]: up when too many layers are skipped,
   down when too few, for at most `lambda_max_steps` steps (then the set nearest the band).
   It carries over from one selection to the next.
4. Search (`ConfLayersPolicy`). The first set skips every other inner layer (1, 3, 5, ...).
   Each set drafts for `eval_rounds` rounds. Accepted tokens are counted as the paper's code
   counts them: accepted drafts per round, the full model's bonus token excluded (our
   statistics' `accepted` minus one); the acceptance rate is the mean over rounds of accepted
   drafts / drafted. If both exceed `stop_accepted` and `stop_acceptance`, the search stops with
   this set. Otherwise the set becomes the best so far if its mean accepted drafts are the
   highest yet, and a fresh confidence forward proposes the next set. A set whose mean accepted
   drafts are below `early_min_accepted` after `early_rounds` rounds is replaced at once. After
   `max_iterations` sets the search stops with the best one. As in the published code, the
   search lives as long as the decoder: later generations continue it or use its result.
   Each selection's time (confidence forward and rule) is reported as CLaSp's DP time is, in
   `Generation.refresh_times`.

The skip set changes from the host between segments of rounds (`Decoder.put_skip_set`); a
segment runs on the device until the set in force is next judged (after `early_rounds`, then
`eval_rounds` of its evaluation), so the search reads each round's statistics only then. On
the reference path a set is just a new bool[L] value, so nothing retraces; on the accelerator
path the active layers are picked again (their own buffers, no copy), and each M compiles its
own segment once (`ConfLayers.skip_counts`: every size a selection may give).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax import model as model_lib
from clasp_jax import xla_options
from clasp_jax.strategies import layer_skip
from clasp_jax.strategies.base import Policy, Segment, Strategy

# The published window scale: w_k = 2 + int(5 * count * g2_k * (k + 1) / L).
_BASE_WINDOW = 2
_WINDOW_SCALE = 5
# g2 counts as flat (all 0.5) below this range: float noise on z-scores of order 1.
_FLAT = 1e-12


def sublayer_confidence(m_BTD: jax.Array, valid_BT: jax.Array) -> jax.Array:
  """1 - mean over the valid tokens of H(softmax(m_t)) / log D: 1 when every token's output
  puts all its mass on one hidden unit, 0 when it is spread evenly. float32 scalar."""
  logp_BTD = jax.nn.log_softmax(m_BTD.astype(jnp.float32), axis=-1)
  entropy_BT = -jnp.sum(jnp.exp(logp_BTD) * logp_BTD, axis=-1)
  mean_entropy = jnp.sum(jnp.where(valid_BT, entropy_BT, 0.0)) / jnp.sum(valid_BT)
  return 1.0 - mean_entropy / jnp.log(jnp.float32(m_BTD.shape[-1]))


def layer_confidence(params, config, state, *, window: int) -> jax.Array:
  """c_i = conf(attention_i) + conf(MLP_i) over the last `window` generated tokens. float32[L].

  Jittable; `window` is static. Fewer tokens than `window` (early in a generation) are padded
  at the end of the chunk, where the causal mask keeps them from the real ones, and left out
  of the mean. The cache is only read.
  """
  num_valid = jnp.minimum(window, state.num_tokens - state.prompt_len)
  start = state.num_tokens - num_valid
  t_W = jnp.arange(window)
  tokens_W = state.tokens_N[jnp.minimum(start + t_W, state.tokens_N.shape[0] - 1)]
  valid_1W = (t_W < num_valid)[None]

  def confidence(attn_BTD, mlp_BTD):
    return sublayer_confidence(attn_BTD, valid_1W) + sublayer_confidence(mlp_BTD, valid_1W)

  return model_lib.sublayer_stats(params, config, tokens_W[None], state.cache, start,
                                  confidence)


def normalise_to_mean_half(g_N: np.ndarray) -> np.ndarray:
  """The affine map of g (positive slope) that sends its mean to 0.5 and its extreme farther
  from the mean to 0 or 1, so the result lies in [0, 1] with mean 0.5; all 0.5 when g is flat.

  This is the published min-max scaling to [0, 1] followed by the shift and scale about the
  mean, composed into one map.
  """
  mean, low, high = g_N.mean(), g_N.min(), g_N.max()
  if high - low <= _FLAT:
    return np.full_like(g_N, 0.5)
  slope = min(0.5 / (high - mean), 0.5 / (mean - low))
  return np.clip(0.5 + slope * (g_N - mean), 0.0, 1.0)


def leading_run(g_N: np.ndarray) -> int:
  """How many values at the start of g equal its first one (exactly, as published)."""
  differs_N = g_N != g_N[0]
  return int(np.argmax(differs_N)) if differs_N.any() else len(g_N)


def zscore(c_N: np.ndarray) -> np.ndarray:
  """(c - mean) / (std + 1e-6), as published (population std)."""
  c_N = np.asarray(c_N, np.float64)
  return (c_N - c_N.mean()) / (c_N.std() + 1e-6)


def windows(z_N: np.ndarray, num_layers: int) -> np.ndarray:
  """The window size w_k of each inner layer k (layer k + 1) from the z-scores of the inner
  layers' confidences. int[L - 2]."""
  g2_N = np.gradient(np.gradient(z_N))
  count = leading_run(g2_N)
  k_N = np.arange(len(z_N))
  # Multiplied in the published order, so int() truncates the same products.
  scale_N = (_WINDOW_SCALE * count) * normalise_to_mean_half(g2_N) * ((k_N + 1) / num_layers)
  return _BASE_WINDOW + scale_N.astype(int)


def select_skip_layers(conf_L: np.ndarray, lam: float) -> np.ndarray:
  """The layers whose confidence falls below their neighbourhood: bool[L].

  Inner layer k is skipped when z_k < mean - lam * std over its neighbours within w_k // 2
  (itself excluded); the first and last layer are never skipped.
  """
  z_N = zscore(conf_L[1:-1])
  skip_L = np.zeros(len(conf_L), bool)
  for k, w in enumerate(windows(z_N, len(conf_L))):
    half = w // 2
    near = np.concatenate([z_N[max(0, k - half):k], z_N[k + 1:k + half + 1]])
    skip_L[k + 1] = z_N[k] < near.mean() - lam * near.std()
  return skip_L


def skip_ratio(skip_L: np.ndarray) -> float:
  """Skipped layers over the L - 2 that can be skipped."""
  return float(skip_L.sum()) / (len(skip_L) - 2)


def select_in_band(conf_L: np.ndarray, lam: float, *, ratio: float, band: float,
                   step: float, max_steps: int) -> tuple[np.ndarray, float]:
  """`select_skip_layers`, lambda moved by `step` until the skip ratio is in
  [ratio, ratio + band]: raised while too many layers are skipped, lowered while too few.

  Returns:
    The skip set bool[L] and its lambda: the first in the band, or after `max_steps` moves the
    one nearest to it (the earliest of equals).
  """
  tried = []
  for _ in range(max_steps + 1):
    skip_L = select_skip_layers(conf_L, lam)
    r = skip_ratio(skip_L)
    if ratio <= r <= ratio + band:
      return skip_L, lam
    tried.append((max(ratio - r, r - ratio - band), skip_L, lam))
    lam += step if r > ratio + band else -step
  _, skip_L, lam = min(tried, key=lambda t: t[0])
  return skip_L, lam


def every_other_layer(num_layers: int) -> np.ndarray:
  """The first set searched: inner layers 1, 3, 5, ... skipped. bool[L]."""
  skip_L = np.zeros(num_layers, bool)
  skip_L[1:num_layers - 1:2] = True
  return skip_L


# What one set's evaluation concludes, after a round.
KEEP_EVALUATING, REPLACE_EARLY, EVALUATED, STOP = range(4)


def judge(accepted_drafts: list[int], rates: list[float], strategy: ConfLayers) -> int:
  """The verdict on the set in force from its rounds so far (accepted drafts per round, the
  bonus token excluded; per-round acceptance rates)."""
  rounds, mean_accepted = len(accepted_drafts), float(np.mean(accepted_drafts))
  if rounds == strategy.early_rounds and mean_accepted < strategy.early_min_accepted:
    return REPLACE_EARLY
  if rounds < strategy.eval_rounds:
    return KEEP_EVALUATING
  if (mean_accepted > strategy.stop_accepted
      and float(np.mean(rates)) > strategy.stop_acceptance):
    return STOP
  return EVALUATED


class ConfLayersPolicy(Policy):
  """The confidence-driven skip-set search, kept on the decoder across its generations.

  Args:
    strategy: the `ConfLayers` settings.
    config: the model config.
  """

  def __init__(self, strategy: ConfLayers, config):
    self.s = strategy
    self.current_L = every_other_layer(config.num_layers)
    self.best_L, self.best_accepted = self.current_L, -np.inf
    self.lam = strategy.initial_lambda
    self.iterations = 1  # sets tried, the current one included
    self.searching, self.reselect = True, False
    self.accepted_drafts, self.rates = [], []
    self._confidence = jax.jit(functools.partial(layer_confidence, config=config,
                                                 window=strategy.window),
                               compiler_options=xla_options.compiler_options())
    self.start_generation()

  def start_generation(self) -> None:
    """A new generation's state holds the initial set: the current one must be put back."""
    self.applied = False

  @property
  def observes(self) -> bool:
    return self.searching

  def _rounds_to_verdict(self) -> int:
    """Rounds until the set in force is judged next (after `early_rounds`, then after
    `eval_rounds` of its evaluation)."""
    seen = len(self.accepted_drafts)
    return min(r for r in (self.s.early_rounds, self.s.eval_rounds, seen + 1) if r > seen) - seen

  def next_segment(self, decoder, state):
    if self.reselect:
      t0 = time.perf_counter()
      conf_L = np.asarray(self._confidence(decoder.params, state=state))
      self.current_L, self.lam = select_in_band(
          conf_L, self.lam, ratio=self.s.skip_ratio, band=self.s.ratio_band,
          step=self.s.lambda_step, max_steps=self.s.lambda_max_steps)
      decoder.refresh_seconds.append(time.perf_counter() - t0)
      self.iterations += 1
      self.reselect, self.applied = False, False
    if not self.applied:
      state = decoder.put_skip_set(state, self.current_L)
      self.applied = True
    if not self.searching:
      return state, Segment(draft=True)
    return state, Segment(draft=True, rounds=self._rounds_to_verdict())

  def observe(self, accepted_R, drafted_R, source_R, seconds=None):
    del source_R, seconds  # every round drafts with layers skipped
    for accepted, drafted in zip(accepted_R, drafted_R):
      if self.searching:
        self._judge_round(int(accepted), int(drafted))

  def _judge_round(self, accepted: int, drafted: int) -> None:
    """Counts one round of the set in force; judges the set at its checkpoints."""
    self.accepted_drafts.append(accepted - 1)
    self.rates.append((accepted - 1) / drafted)  # every round drafts at least one token
    verdict = judge(self.accepted_drafts, self.rates, self.s)
    if verdict == KEEP_EVALUATING:
      return
    if verdict == EVALUATED and np.mean(self.accepted_drafts) > self.best_accepted:
      self.best_L, self.best_accepted = self.current_L, float(np.mean(self.accepted_drafts))
    self.accepted_drafts, self.rates = [], []
    if verdict == STOP:
      self.searching = False
    elif self.iterations >= self.s.max_iterations:
      self.searching, self.current_L, self.applied = False, self.best_L, False
    else:
      self.reselect = True


@dataclasses.dataclass(frozen=True)
class ConfLayers(layer_skip.LayerSkipDrafting, Strategy):
  """Self-speculative decoding whose skip set a confidence-driven search chooses.

  Attributes:
    num_draft_tokens: K, the most drafts per round.
    draft_exit_threshold: DET, stop drafting below this top-1 probability.
    window: W, generated tokens in the confidence forward.
    skip_ratio: r, the least skip ratio (skipped / (L - 2)) a selection aims for.
    ratio_band: the selection aims for a ratio in [r, r + ratio_band].
    initial_lambda: lambda of the first selection.
    lambda_step: how far lambda moves per step.
    lambda_max_steps: the most lambda steps per selection.
    eval_rounds: drafting rounds that evaluate one set.
    early_rounds: rounds after which a poor set is replaced early.
    early_min_accepted: mean accepted drafts per round (bonus excluded) below which a set
      is poor.
    stop_accepted: mean accepted drafts per round (bonus excluded) to exceed to stop searching.
    stop_acceptance: mean acceptance rate (accepted drafts / drafted) to exceed to stop.
    max_iterations: the most sets tried before settling on the best.
  """

  num_draft_tokens: int = 8
  draft_exit_threshold: float = 0.7
  window: int = 100
  skip_ratio: float = 0.4
  ratio_band: float = 0.25
  initial_lambda: float = 0.0
  lambda_step: float = 0.05
  lambda_max_steps: int = 40
  eval_rounds: int = 30
  early_rounds: int = 15
  early_min_accepted: float = 1.0
  stop_accepted: float = 4.0
  stop_acceptance: float = 0.95
  max_iterations: int = 100

  @property
  def name(self) -> str:
    return 'conflayers'

  def validate(self, config):
    self.validate_drafting()
    if config.num_layers < 4:
      raise ValueError(f'conflayers compares inner layers: it needs L >= 4, got '
                       f'{config.num_layers}')
    checks = [(self.window >= 1, f'window (W) must be >= 1, got {self.window}'),
              (0.0 <= self.skip_ratio < 1.0, f'skip_ratio (r) must be in [0, 1), got '
               f'{self.skip_ratio}'),
              (self.ratio_band >= 0.0, f'ratio_band must be >= 0, got {self.ratio_band}'),
              (self.lambda_step > 0.0, f'lambda_step must be > 0, got {self.lambda_step}'),
              (self.lambda_max_steps >= 0, f'lambda_max_steps must be >= 0, got '
               f'{self.lambda_max_steps}'),
              (self.eval_rounds >= 1, f'eval_rounds must be >= 1, got {self.eval_rounds}'),
              (self.early_rounds >= 1, f'early_rounds must be >= 1, got {self.early_rounds}'),
              (self.max_iterations >= 1, f'max_iterations must be >= 1, got '
               f'{self.max_iterations}')]
    for ok, message in checks:
      if not ok:
        raise ValueError(f'conflayers {message}')

  def skip_counts(self, config):
    """Every M a selection may give: skip ratios in [r, r + band] of the L - 2 inner layers
    (lambda's walk may end just outside the band), the every-other-layer start included."""
    inner = config.num_layers - 2
    low = max(1, int(np.floor(self.skip_ratio * inner)) - 1)
    high = min(inner, int(np.ceil((self.skip_ratio + self.ratio_band) * inner)) + 1)
    return tuple(sorted(set(range(low, high + 1))
                        | {int(every_other_layer(config.num_layers).sum())}))

  def make_policy(self, decoder, max_new_tokens):
    del max_new_tokens  # the search spans generations
    policy = getattr(decoder, 'conflayers_policy', None)
    if policy is None:
      policy = decoder.conflayers_policy = ConfLayersPolicy(self, decoder.config)
    policy.start_generation()
    return policy
