"""CLaSp with an adaptive skip budget: M chosen online, never slower than plain decoding.

A fixed M that suits a 70B model makes a small model slower than plain decoding: its layers
are less redundant, so drafts are rejected sooner. Here M is chosen to maximise expected
tokens per second:

  rate(M) = E[tokens per round] / E[seconds per round]
  E[tokens per round] = (1 - a^(d+1)) / (1 - a)        (d drafts, each accepted w.p. a)
  E[seconds per round] = d * draft_step(L - M) + verify(K+1) + dp / LOI

with the per-token acceptance rate a(M) and the mean drafts per round d(M) observed at each
M this generation, and the step costs measured once per device and model (`measure_costs`).
Plain decoding runs at 1 / full_step; when no M beats it, the policy decodes plainly and
probes drafting again after a back-off, so a generation that becomes predictable can still
speed up. Neighbouring M values are explored for a few rounds now and then.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax import model as model_lib
from clasp_jax.cache import init_cache
from clasp_jax.strategies import layer_skip
from clasp_jax.strategies.base import Policy, Strategy
from clasp_jax.strategies.clasp import backtrack, clasp_dp_table


@dataclasses.dataclass(frozen=True)
class Costs:
  """Seconds per piece of a round, for one model on one device.

  Attributes:
    full_step: a plain decoding step (one token, every layer).
    draft_base: a draft step's cost besides its layers (embedding, LM head, dispatch).
    draft_per_layer: a draft step's cost per active layer.
    verify: a verify pass of K+1 tokens.
    dp: one skip-set refresh (the CLaSp DP).
  """

  full_step: float
  draft_base: float
  draft_per_layer: float
  verify: float
  dp: float

  def draft_step(self, num_active: int) -> float:
    return self.draft_base + num_active * self.draft_per_layer


def expected_tokens(alpha: float, num_drafts: float) -> float:
  """Expected tokens committed per round: accepted drafts plus the full model's token."""
  if alpha >= 1.0:
    return num_drafts + 1.0
  return (1.0 - alpha ** (num_drafts + 1.0)) / (1.0 - alpha)


def expected_rate(alpha: float, num_drafts: float, num_skip: int, num_layers: int,
                  costs: Costs, loi: int) -> float:
  """Expected tokens per second when drafting with M = num_skip."""
  seconds = (num_drafts * costs.draft_step(num_layers - num_skip) + costs.verify
             + costs.dp / loi)
  return expected_tokens(alpha, num_drafts) / seconds


def choose_num_skip(observed: dict[int, tuple[float, float]], costs: Costs, num_layers: int,
                    loi: int, margin: float = 0.0) -> int | None:
  """The M with the highest expected rate, or None (plain decoding) when none beats it.

  Args:
    observed: M -> (acceptance rate a, mean drafts per round d).
    costs: the measured step costs.
    num_layers: L.
    loi: rounds per DP refresh.
    margin: how much faster than plain decoding drafting must be expected to be.
  """
  plain = 1.0 / costs.full_step
  rates = {m: expected_rate(a, d, m, num_layers, costs, loi) for m, (a, d) in observed.items()}
  if not rates:
    return None
  best = max(rates, key=rates.get)
  return best if rates[best] > plain * (1.0 + margin) else None


def _median_seconds(fn, *args, reps: int = 5) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def measure_costs(decoder, max_skip: int, context: int = 512) -> Costs:
  """Times the pieces of a round for the decoder's model on this device (a few compiles).

  The draft step is timed with all layers and with half of them active, through the path the
  decoder drafts with (the active layers alone, or per-layer `lax.cond`), and fitted linearly
  in the number of active layers.
  """
  params, config, K = decoder.params, decoder.config, decoder.strategy.num_draft_tokens
  L = config.num_layers
  cache = init_cache(config, context, dtype=params['embed'].dtype).rollback(context // 2)
  token_11 = jnp.ones((1, 1), jnp.int32)
  skip_L = jnp.asarray(np.arange(L) % 2 == 1)
  num_active = L - int(skip_L.sum())
  full = jax.jit(lambda p, c, t: model_lib.forward(p, config, t, c).logits_BPV)
  t_full = _median_seconds(full, params, cache, token_11)
  if model_lib.is_per_layer(params):
    layers, ids_A = model_lib.active_layers(params, skip_L)
    draft = jax.jit(lambda p, layers, c, t: model_lib.forward(
        dict(p, layers=layers), config, t, c, layer_ids_A=jnp.asarray(ids_A)).logits_BPV)
    t_all, t_half = t_full, _median_seconds(draft, params, layers, cache, token_11)
  else:
    draft = jax.jit(lambda p, c, t, s: model_lib.forward(p, config, t, c, skip_L=s).logits_BPV)
    t_all = _median_seconds(draft, params, cache, token_11, jnp.zeros((L,), bool))
    t_half = _median_seconds(draft, params, cache, token_11, skip_L)
  per_layer = max(t_all - t_half, 0.0) / (L - num_active)
  verify = jax.jit(lambda p, c, t: model_lib.forward(p, config, t, c,
                                                     return_hiddens=True).logits_BPV)
  t_verify = _median_seconds(verify, params, cache, jnp.ones((1, K + 1), jnp.int32))
  dp = jax.jit(clasp_dp_table, static_argnums=(1, 4))
  hidden_LD = jnp.ones((L + 1, config.hidden_size), params['embed'].dtype)
  t_dp = _median_seconds(dp, params, config, cache, hidden_LD, max_skip, reps=3)
  return Costs(full_step=t_full, draft_base=max(t_all - L * per_layer, 0.0),
               draft_per_layer=per_layer, verify=t_verify, dp=t_dp)


def cached_costs(decoder, max_skip: int, cache_dir: str | None) -> Costs:
  """`measure_costs`, remembered per device, model shape, dtype, K and path in a JSON file."""
  config, params = decoder.config, decoder.params
  key = '|'.join(map(str, (jax.devices()[0].device_kind, config.num_layers, config.hidden_size,
                           config.intermediate_size, config.vocab_size,
                           params['embed'].dtype, decoder.strategy.num_draft_tokens,
                           model_lib.is_per_layer(params), max_skip)))
  path = os.path.join(cache_dir, 'costs.json') if cache_dir else None
  table = {}
  if path and os.path.exists(path):
    with open(path) as f:
      table = json.load(f)
  if key not in table:
    table[key] = dataclasses.asdict(measure_costs(decoder, max_skip))
    if path:
      os.makedirs(cache_dir, exist_ok=True)
      with open(path, 'w') as f:
        json.dump(table, f, indent=1)
  return Costs(**table[key])


@dataclasses.dataclass
class _Tally:
  """Decayed counts of what drafting at one M produced."""

  accepted: float = 0.0  # accepted drafts
  rejected: float = 0.0  # rounds that ended in a rejection
  drafted: float = 0.0   # drafts proposed
  rounds: float = 0.0

  def add(self, accepted: int, drafted: int, decay: float) -> None:
    self.accepted = decay * self.accepted + accepted
    self.rejected = decay * self.rejected + (accepted < drafted)
    self.drafted = decay * self.drafted + drafted
    self.rounds = decay * self.rounds + 1

  def estimate(self, prior_alpha: float, prior_weight: float) -> tuple[float, float]:
    alpha = ((self.accepted + prior_weight * prior_alpha)
             / (self.accepted + self.rejected + prior_weight))
    return alpha, self.drafted / self.rounds


class AdaptivePolicy(Policy):
  """Chooses M (or plain decoding) between rounds from observed acceptance and measured costs.

  One policy serves every generation of a decoder: what drafting at each M achieved carries
  over (decayed per round), so later prompts start from informed estimates; the plain-decoding
  back-off restarts with each generation.

  Args:
    strategy: the `AdaptiveClasp` settings.
    costs: measured step costs.
    num_layers: L.
  """

  def __init__(self, strategy: AdaptiveClasp, costs: Costs, num_layers: int):
    self.s, self.costs, self.L = strategy, costs, num_layers
    self.tallies: dict[int, _Tally] = {}
    self.chosen = strategy.initial_skip_layers
    self.start_generation()

  def start_generation(self) -> None:
    """Resets what is specific to one generation (the cache and skip set are new)."""
    self.num_skip = self.chosen
    self.plain_left = 0
    self.backoff = self.s.backoff_rounds
    self.draft_rounds = 0  # since drafting (re)started
    self.refreshed_at = None
    self.since_refresh = 0

  def _observed(self) -> dict[int, tuple[float, float]]:
    return {m: t.estimate(self.s.prior_alpha, self.s.prior_weight)
            for m, t in self.tallies.items() if t.rounds > 0}

  def drafting_can_pay(self) -> bool:
    """Whether any M could beat plain decoding at an optimistic acceptance rate (the best
    seen, or `optimistic_alpha`) with K drafts per round: if not, probing only costs."""
    alpha = max([self.s.optimistic_alpha] + [a for a, _ in self._observed().values()])
    rates = [expected_rate(alpha, self.s.num_draft_tokens, m, self.L, self.costs, self.s.loi)
             for m in range(1, self.s.max_skip_layers + 1)]
    return max(rates) > 1.0 / self.costs.full_step

  def _explore_target(self) -> int:
    """Every `explore_every` drafting rounds, a neighbour of the chosen M for a few rounds."""
    cycle = self.draft_rounds % self.s.explore_every
    if self.draft_rounds < self.s.explore_every or cycle >= self.s.explore_rounds:
      return self.chosen
    step = self.s.explore_step * (1 if (self.draft_rounds // self.s.explore_every) % 2 else -1)
    return int(np.clip(self.chosen + step, 1, self.s.max_skip_layers))

  def _go_plain(self) -> None:
    self.plain_left = self.backoff
    self.backoff = min(2 * self.backoff, self.s.max_backoff_rounds)
    self.draft_rounds = 0

  def before_round(self, decoder, state):
    if self.plain_left == 0 and self.draft_rounds == 0 and not self.drafting_can_pay():
      self._go_plain()
    if self.plain_left > 0:
      self.plain_left -= 1
      return state, False
    self.num_skip = self._explore_target()
    if self.refreshed_at != self.num_skip or self.since_refresh >= self.s.loi:
      state = decoder.refresh(state, self.num_skip)
      self.refreshed_at, self.since_refresh = self.num_skip, 0
    self.since_refresh += 1
    return state, True

  def after_round(self, accepted, drafted, seconds):
    del seconds  # costs come from the one-time measurement, not from noisy round times
    if not drafted:
      return
    self.draft_rounds += 1
    self.tallies.setdefault(self.num_skip, _Tally()).add(accepted - 1, drafted, self.s.decay)
    if self.draft_rounds < self.s.warmup_rounds:
      return
    best = choose_num_skip(self._observed(), self.costs, self.L, self.s.loi, self.s.margin)
    if best is None:  # drafting does not pay now: decode plainly, then probe again
      self._go_plain()
    else:
      self.chosen = best
      self.backoff = self.s.backoff_rounds


@dataclasses.dataclass(frozen=True)
class AdaptiveClasp(layer_skip.LayerSkipDrafting, Strategy):
  """CLaSp whose number of skipped layers M is chosen online (`--skip_layers=auto`).

  Attributes:
    max_skip_layers: the largest M considered (the DP is compiled for it).
    initial_skip_layers: M for the first rounds.
    num_draft_tokens: K.
    draft_exit_threshold: DET.
    loi: rounds per DP refresh.
    warmup_rounds: drafting rounds observed before the first decision.
    explore_every: drafting rounds between explorations of a neighbouring M.
    explore_rounds: rounds spent at the neighbour.
    explore_step: how far the neighbour is from the chosen M.
    backoff_rounds: plain rounds before drafting is probed again (doubles while it keeps
      not paying, up to `max_backoff_rounds`).
    max_backoff_rounds: the longest back-off.
    decay: weight kept by older observations per new one (tracks changing text).
    prior_alpha: acceptance rate assumed before observing (pseudo-counts below).
    prior_weight: pseudo-count of the prior.
    optimistic_alpha: the acceptance rate assumed when deciding whether probing could pay.
    margin: required expected gain over plain decoding.
    cost_cache_dir: where measured costs are remembered (None: measure every process).
  """

  max_skip_layers: int = 8
  initial_skip_layers: int = 2
  num_draft_tokens: int = 8
  draft_exit_threshold: float = 0.7
  loi: int = 4
  warmup_rounds: int = 2
  explore_every: int = 16
  explore_rounds: int = 2
  explore_step: int = 1
  backoff_rounds: int = 32
  max_backoff_rounds: int = 256
  decay: float = 0.95
  prior_alpha: float = 0.5
  prior_weight: float = 2.0
  optimistic_alpha: float = 0.9
  margin: float = 0.0
  cost_cache_dir: str | None = None
  needs_hiddens = True

  @property
  def name(self) -> str:
    return 'clasp'

  def validate(self, config):
    self.validate_drafting()
    if not 1 <= self.initial_skip_layers <= self.max_skip_layers < config.num_layers:
      raise ValueError(f'need 1 <= initial_skip_layers <= max_skip_layers < L = '
                       f'{config.num_layers}, got {self.initial_skip_layers}, '
                       f'{self.max_skip_layers}')
    if self.loi < 1:
      raise ValueError(f'loi must be >= 1, got {self.loi}')

  def refresh(self, params, config, state, num_skip):
    table_LJ = clasp_dp_table(params, config, state.cache, state.target_hidden_LD,
                              self.max_skip_layers)
    return backtrack(table_LJ, num_skip)  # one compiled DP serves every M

  def make_policy(self, decoder):
    policy = getattr(decoder, 'adaptive_policy', None)
    if policy is None:
      costs = cached_costs(decoder, self.max_skip_layers, self.cost_cache_dir)
      policy = decoder.adaptive_policy = AdaptivePolicy(self, costs, decoder.config.num_layers)
    policy.start_generation()
    return policy
