"""CLaSp with an adaptive skip budget: M chosen online, never slower than plain decoding.

A fixed M that suits a 70B model makes a small model slower than plain decoding: its layers
are less redundant, so drafts are rejected sooner. Here M is chosen to maximise expected
tokens per second:

  rate(M) = E[tokens per round] / E[seconds per round]
  E[tokens per round] = (1 - a^(d+1)) / (1 - a)        (d drafts, each accepted w.p. a)
  E[seconds per round] = d * draft_step(L - M) + verify + (refresh + return) / LOI

with the per-token acceptance rate a(M) (taken one standard error above its estimate: an
optimism that a few more samples settle), the drafts per round d = 1 + c + ... + c^(limit-1)
under a draft limit, from the rate c(M) at which a draft step is followed by another (a round
the limit ended counts as one that might have drafted on), and the step costs measured once
per device and model (`measure_costs`, through the decoder's own compiled rounds, so they are
what a round really pays). Plain decoding runs at
1 / full_step; when no M beats it, the policy decodes plainly and probes drafting again, at
the most promising M, after a back-off, so a generation that becomes predictable can still
speed up. A back-off lasts long enough that the probe after it, if it finds nothing, costs at
most `probe_budget` of the plain decoding before it (a probe pays a DP and two returns to the
host: on a small model, a dozen plain steps; its cost is timed, as the last probe took).
Where not even an optimistic acceptance rate would pay at the measured costs, it decodes
plainly to the generation's end, in one segment. M moves on a grid of a few values
(`AdaptiveClasp.candidates`): on accelerators every M compiles its own drafting round, all of
them before a benchmark's timing starts. Now and then a drafting segment tries a neighbouring
M on the grid, ever more rarely while tries leave the choice where it was; the policy moves to
another M only for an expected gain of `switch_margin` (a new M costs a refresh).

The policy works in segments of rounds that run on the device: a drafting segment is one
refresh period (the DP, then rounds at one M; see below for the verify passes' DP), a plain
segment the whole back-off; it reads each drafting segment's per-round statistics when the
segment ends. With prompt lookup on, rounds with a lookup match take the copied drafts and do
not count towards a segment's rounds (`Segment.rounds`): a refresh period is LOI rounds drafted
with layers skipped, however many lookup rounds come between them, so a refresh is paid for by
the rounds that use it. Where the verify passes fill the DP's table, a drafting segment runs up
to `max_loi` rounds and the device ends it sooner only when, at one of its every-LOI-rounds
checks, a refresh would change the skip set (`Segment.refresh_every`), as a fixed M's segments
do: a refresh that keeps the set costs no return to the host. Elsewhere a refresh period starts
at LOI rounds and doubles, up to `max_loi`, each time the DP returns the skip set already in
force: the paper's sparse persistence (skip sets change slowly from token to token) measured
rather than assumed, since a refresh there costs a few verify passes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax import attention as attention_lib
from clasp_jax.strategies import layer_skip
from clasp_jax.strategies.base import LOOKUP, SKIP, Policy, Segment, Strategy, refresh_period
from clasp_jax.strategies.clasp import backtrack, clasp_dp_table


@dataclasses.dataclass(frozen=True)
class Costs:
  """Seconds per piece of a round, for one model on one device.

  Attributes:
    full_step: a plain decoding step (one full-model pass, every layer).
    draft_base: a draft step's cost besides its layers (embedding, LM head).
    draft_per_layer: a draft step's cost per active layer.
    verify: a drafting round's cost besides its draft steps: the verify pass of K+1 tokens,
      with the DP's bands where the verify passes fill its table.
    dp: one skip-set refresh (the CLaSp DP and putting the new set in force).
    segment: a segment's cost besides its rounds: its dispatch, the device loop's start and
      end, and the host reading its report back (what each return to the host costs).
  """

  full_step: float
  draft_base: float
  draft_per_layer: float
  verify: float
  dp: float
  segment: float = 0.0

  def draft_step(self, num_active: int) -> float:
    return self.draft_base + num_active * self.draft_per_layer


def expected_tokens(alpha: float, num_drafts: float) -> float:
  """Expected tokens committed per round: accepted drafts plus the full model's token."""
  if alpha >= 1.0:
    return num_drafts + 1.0
  return (1.0 - alpha ** (num_drafts + 1.0)) / (1.0 - alpha)


def expected_drafts(continue_rate: float, limit: int) -> float:
  """Expected drafts of a round that drafts at most `limit`, each draft followed by another
  with probability `continue_rate` (until the draft-exit threshold stops it)."""
  return float(sum(continue_rate ** i for i in range(limit)))


def expected_rate(alpha: float, num_drafts: float, num_skip: int, num_layers: int,
                  costs: Costs, loi: float) -> float:
  """Expected tokens per second of a round that drafts with M = num_skip, when one refresh
  and one return to the host serve `loi` such rounds."""
  seconds = (num_drafts * costs.draft_step(num_layers - num_skip) + costs.verify
             + (costs.dp + costs.segment) / loi)
  return expected_tokens(alpha, num_drafts) / seconds


def best_num_skip(observed: dict[int, tuple[float, float]], costs: Costs, num_layers: int,
                  loi: float, max_drafts: int) -> tuple[tuple[int, int], float] | None:
  """The M and the draft limit with the highest expected rate, and that rate over plain
  decoding's (below 1 when drafting is not expected to pay).

  A round drafts until the draft-exit threshold stops it, or the limit: at an acceptance rate
  too low for K drafts to pay, fewer may (each draft is accepted less often than the last).

  Args:
    observed: M -> (acceptance rate a, rate c at which a draft is followed by another).
    costs: the measured step costs.
    num_layers: L.
    loi: rounds drafted with layers skipped per DP refresh.
    max_drafts: K, the most drafts a round may make.

  Returns:
    ((M, the most drafts per round), expected speedup), or None when nothing is observed.
  """
  rates = {(m, limit): expected_rate(a, expected_drafts(c, limit), m, num_layers, costs, loi)
           for m, (a, c) in observed.items() for limit in range(1, max_drafts + 1)}
  if not rates:
    return None
  best = max(rates, key=rates.get)
  return best, rates[best] * costs.full_step


def _copy(state):
  """A copy of a decode state, for a measurement that must leave the original alone."""
  return jax.tree.map(jnp.copy, state)


def _timed_segment(decoder, state, segment: Segment, max_new_tokens: int, repeats: int = 1):
  """(seconds, rounds, drafts made with layers skipped) of a segment run on copies of
  `state`: the fastest of `repeats` runs, on accelerators after an untimed run on another
  copy: a program's first run on a GPU also loads its kernels (timed on its first run, a plain
  step of the 8B shape on an H200 measured 6.7 ms, against 4.6 ms through `generate`). On a
  CPU a first run times as the next one does to within a few milliseconds (SmolLM2-135M's five
  segments on a 2-core Xeon: within 3%), so it is timed at once, halving what a first
  generation spends measuring."""
  decoder.compile_segment(state, segment)
  if jax.default_backend() != 'cpu':
    jax.block_until_ready(decoder.run_segment(_copy(state), segment, max_new_tokens))
  rounds_before = int(state.num_rounds)
  seconds = []
  for _ in range(repeats):
    run = _copy(state)
    start = time.perf_counter()
    _, report = decoder.run_segment(run, segment, max_new_tokens)
    report = jax.device_get(report)
    seconds.append(time.perf_counter() - start)
  rounds, drafted_R, source_R = report.num_rounds, report.drafted_R, report.source_R
  ran = slice(rounds_before, int(rounds))
  return (min(seconds), int(rounds) - rounds_before,
          int(drafted_R[ran][source_R[ran] == SKIP].sum()))


def measure_costs(decoder, state, max_new_tokens: int, skip_counts: tuple[int, int],
                  rounds: int = 8) -> Costs:
  """Times the pieces of a round through the decoder's own compiled segments.

  On copies of a generation's state (left untouched): segments of one and of `rounds` plain
  steps give the full step and what a segment costs besides its rounds (a return to the host),
  which the other figures leave out; a drafting segment whose rounds may draft nothing (a
  draft limit of 0) gives the verify pass as drafting rounds run it, with all a round does
  besides drafting (the DP's bands, where the verify passes fill its table: a plain step's
  cost would leave them to be charged to the draft steps, the most per step where the fewest
  drafts ran); drafting segments at two skip counts give the draft step as a line in the
  number of active layers (each segment's time less its rounds' verify passes, over the draft
  steps it ran; rounds with a lookup match copy their drafts for free); the DP as a program of
  its own, its set put in force, gives a refresh's cost. Timing whole segments on the device,
  rather than pieces dispatched one by one, measures what a round really costs inside the
  device loop.

  Args:
    decoder: the `Decoder`.
    state: a generation's state after its prefill.
    max_new_tokens: the generation's token budget (the segments stop at it).
    skip_counts: two values of M to draft with.
    rounds: rounds per timed segment.
  """
  config = decoder.config

  def drafting(num_skip, draft_limit=np.iinfo(np.int32).max):
    """(seconds, rounds, drafts) of a drafting segment at M = num_skip, spread evenly."""
    skip_L = layer_skip.skip_vector(config, layer_skip.evenly_spaced_skip_set(config, num_skip))
    start = decoder.put_skip_set(state, skip_L).replace(
        draft_limit=jax.device_put(np.int32(draft_limit)))
    return _timed_segment(decoder, start, Segment(True, rounds), max_new_tokens)

  # `segment` is this run less a step: a few milliseconds, which a first run's own cost
  # tripled on a CPU (SmolLM2-135M on a 2-core Xeon: 4.8-7.9 ms first, 0.1-2.4 ms after).
  one_s, one_rounds, _ = _timed_segment(decoder, state, Segment(False, 1), max_new_tokens,
                                        repeats=3)
  plain_s, plain_rounds, _ = _timed_segment(decoder, state, Segment(False, rounds),
                                            max_new_tokens)
  full_step = max(plain_s - one_s, 0.0) / max(plain_rounds - one_rounds, 1)
  segment = max(one_s - one_rounds * full_step, 0.0)
  verify_s, verify_rounds, _ = drafting(skip_counts[0], draft_limit=0)
  verify = max(verify_s - segment, 0.0) / max(verify_rounds, 1)
  per_draft = {}
  for num_skip in skip_counts:
    seconds, n, drafts = drafting(num_skip)
    per_draft[config.num_layers - num_skip] = (max(seconds - segment - n * verify, 0.0)
                                               / max(drafts, 1))
  (a1, t1), (a2, t2) = sorted(per_draft.items())
  per_layer = max(t2 - t1, 0.0) / max(a2 - a1, 1)
  for _ in range(2):  # the first compiles the DP
    start = time.perf_counter()
    skip_L = decoder.choose_skip_set(state, skip_counts[0])
    jax.block_until_ready(decoder.put_skip_set(state, skip_L).skip_L)
    dp = time.perf_counter() - start
  return Costs(full_step=full_step, draft_base=max(t1 - a1 * per_layer, 0.0),
               draft_per_layer=per_layer, verify=verify, dp=dp, segment=segment)


#: Part of every cached measurement's key, raised when `measure_costs` changes what it
#: measures, so that costs measured the earlier way are measured again.
COSTS_VERSION = 4


def cached_costs(decoder, state, max_new_tokens: int, cache_dir: str | None) -> Costs:
  """`measure_costs`, remembered per device, model shape, dtype, decoder settings, the two M
  it is measured at and `COSTS_VERSION`, in a JSON file under `cache_dir` (None: measured in
  every process)."""
  config, params, strategy = decoder.config, decoder.params, decoder.strategy
  grid = strategy.candidates
  pair = (grid[0], grid[-1]) if len(grid) > 1 else (grid[0], max(1, grid[0] // 2))
  key = '|'.join(map(str, (jax.devices()[0].device_kind, config.num_layers, config.hidden_size,
                           config.intermediate_size, config.vocab_size, params['embed'].dtype,
                           strategy.num_draft_tokens, strategy.draft_exit_threshold,
                           decoder.fast_path, decoder.pass_width, decoder.plain_width,
                           decoder.logits_by_row, decoder.searches_in_verify, *pair,
                           f'v{COSTS_VERSION}')))
  path = os.path.join(cache_dir, 'costs.json') if cache_dir else None
  table = {}
  if path and os.path.exists(path):
    with open(path) as f:
      table = json.load(f)
  if key not in table:
    table[key] = dataclasses.asdict(measure_costs(decoder, state, max_new_tokens, pair))
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
  rounds: float = 0.0
  continued: float = 0.0  # draft steps followed by another
  stopped: float = 0.0  # rounds the draft-exit threshold stopped before their limit

  def add(self, accepted: int, drafted: int, limit: int, decay: float) -> None:
    self.accepted = decay * self.accepted + accepted
    self.rejected = decay * self.rejected + (accepted < drafted)
    self.rounds = decay * self.rounds + 1
    self.continued = decay * self.continued + max(drafted - 1, 0)
    self.stopped = decay * self.stopped + (drafted < limit)

  def estimate(self, prior_alpha: float, prior_weight: float,
               optimism: float) -> tuple[float, float]:
    """(acceptance rate, rate at which a draft is followed by another).

    The acceptance rate is the posterior mean plus `optimism` standard errors: a two-round
    probe's few samples leave room to draft on and learn more, many samples pin it down. A
    round that its limit (a probe's, or one the policy set) ended says only that its drafts
    went on up to there, so a low limit, once set, is not taken for what drafting does: until
    the threshold has stopped a round, every draft is taken to be followed by another.
    """
    samples = self.accepted + self.rejected + prior_weight
    alpha = (self.accepted + prior_weight * prior_alpha) / samples
    alpha = min(1.0, alpha + optimism * math.sqrt(alpha * (1.0 - alpha) / samples))
    steps = self.continued + self.stopped
    return alpha, self.continued / steps if steps else 1.0


class AdaptivePolicy(Policy):
  """Chooses M (or plain decoding) between segments from observed acceptance and measured
  costs.

  Beside M it chooses how many drafts a round may make (`DecodeState.draft_limit`), since at a
  middling acceptance rate a short draft pays where K drafts would not. One policy serves every
  generation of a decoder: what drafting at each M achieved carries over (decayed per round),
  and so does the plain-decoding back-off, so that later prompts start from informed estimates
  and a model on which drafting does not pay is probed (a few rounds of a few drafts) ever more
  rarely, not at every prompt, while after drafting that paid the next prompt drafts at once.
  A value of M not tried yet is expected to do as well as the nearest smaller one tried
  (optimism that makes it worth a try: acceptance only falls as more layers are skipped, so a
  try settles it). With prompt lookup on, only the rounds that drafted with layers skipped
  teach it anything, and "plain" means rounds that take lookup drafts when they have a match
  and plain steps otherwise.

  Args:
    strategy: the `AdaptiveClasp` settings.
    num_layers: L.
    costs: measured step costs; None: measured (or read from the cache) at the first segment.
  """

  observes = True

  def __init__(self, strategy: AdaptiveClasp, num_layers: int, costs: Costs | None = None):
    self.s, self.L, self.costs = strategy, num_layers, costs
    self.tallies: dict[int, _Tally] = {}
    self.chosen = strategy.initial_skip_layers
    self.draft_limit = strategy.num_draft_tokens
    self.plain_left = 0
    self.backoff = strategy.backoff_rounds
    self.paying = False  # whether the last decision found drafting to pay
    self.since_try = 0  # rounds drafted since a neighbouring M was last tried
    self.explore_gap = strategy.explore_every  # rounds drafted between tries
    self.tries = 0  # neighbouring M values tried (alternately above and below)
    self.probe_seconds = None  # what the last probe cost beyond plain steps, as timed
    self._refresh_seconds = 0.0  # the running segment's refresh, as timed
    self.start_generation(max_new_tokens=0)

  def start_generation(self, max_new_tokens: int) -> None:
    """Resets what is specific to one generation (the cache and skip set are new)."""
    self.max_new_tokens = max_new_tokens
    self.num_skip = self.chosen
    self.draft_segments = 0  # since drafting (re)started
    self.drafting = False  # whether the segment running drafts with layers skipped
    self.probing = False  # whether it is a probe (few rounds of few drafts)
    self._restart_refreshes()

  def _restart_refreshes(self) -> None:
    """Refreshes start over at LOI rounds (a new generation, or drafting after plain)."""
    self.interval = self.s.loi
    self.last_skip_L = None  # the skip set the last refresh put in force

  def _track_refresh(self, skip_L: np.ndarray) -> None:
    """Doubles the refresh interval (up to `max_loi`) when the DP kept the set in force,
    and goes back to LOI rounds when it changed it."""
    same = self.last_skip_L is not None and np.array_equal(skip_L, self.last_skip_L)
    self.interval = min(2 * self.interval, self.s.longest_period) if same else self.s.loi
    self.last_skip_L = skip_L

  def _observed(self) -> dict[int, tuple[float, float]]:
    """(acceptance, continuation rate) for every candidate M: as observed, or, not tried yet,
    as at the nearest smaller M tried (none smaller: the nearest larger; none tried: nothing).

    Acceptance only falls as more layers are skipped, so a smaller M's figures bound an
    untried M's from above: optimism that makes it worth a try, and that a try settles. A
    larger M's figures bound it from below: taken for it, they would write off the M between
    a good one and a bad one (on the planted models, whose redundant layers run out one step
    below the bad M).
    """
    seen = {m: t.estimate(self.s.prior_alpha, self.s.prior_weight, self.s.optimism)
            for m, t in self.tallies.items() if t.rounds > 0}
    if not seen:
      return {}

    def nearest_tried(m):
      below = [s for s in seen if s <= m]
      return max(below) if below else min(seen)

    return {m: seen[nearest_tried(m)] for m in self.s.candidates}

  def drafting_can_pay(self) -> bool:
    """Whether any M could beat plain decoding at an optimistic acceptance rate (the best
    seen, or `optimistic_alpha`) with K drafts per round: if not, probing only costs."""
    alpha = max([self.s.optimistic_alpha] + [a for a, _ in self._observed().values()])
    rates = [expected_rate(alpha, self.s.num_draft_tokens, m, self.L, self.costs,
                           self.interval) for m in self.s.candidates]
    return max(rates) > 1.0 / self.costs.full_step

  def _explore_target(self) -> int:
    """After `explore_gap` rounds drafted since the last try, a neighbour of the chosen M on
    the grid (above and below by turns, where both are on it); never in a stretch's opening
    segment.

    The rounds are counted over every generation: a generation of a few hundred tokens drafts
    only a few dozen rounds, and a count that started over with each would never reach a try,
    leaving an estimate from one unlucky stretch to stand for good. The gap doubles (up to
    `max_explore_every`) after each try that leaves the choice where it was: a try drafts with
    an M expected to do worse, so once the estimates agree with what tries find, tries only
    cost.
    """
    if self.draft_segments == 0 or self.since_try < self.explore_gap:
      return self.chosen
    self.since_try, self.tries = 0, self.tries + 1
    grid = self.s.candidates
    i = grid.index(self.chosen)
    above, below = grid[i + 1:i + 2], grid[max(i - 1, 0):i]  # at the grid's ends, one side
    side = (above or below) if self.tries % 2 else (below or above)
    return side[0] if side else self.chosen

  def _segment_limit(self) -> int:
    """The most drafts a round of the drafting segment running (or about to) may make."""
    return min(self.s.probe_drafts if self.probing else self.draft_limit,
               self.s.num_draft_tokens)

  def probe_cost(self) -> float:
    """Seconds a probe costs beyond the plain steps it stands in for: as the last one took
    (`observe`), or, before any was timed, estimated at the chosen M with every draft
    rejected: at most a DP as a program of its own, two returns to the host, and its rounds'
    draft steps and verify passes less a plain step each."""
    if self.probe_seconds is not None:
      return self.probe_seconds
    c = self.costs
    round_loss = (self.s.probe_drafts * c.draft_step(self.L - self.chosen) + c.verify
                  - c.full_step)
    return c.dp + 2 * c.segment + self.s.probe_rounds * max(round_loss, 0.0)

  def _go_plain(self) -> None:
    """Plain rounds until the next probe: the back-off, or more where the probe would
    cost more than `probe_budget` of their time."""
    self.paying = False
    budget_rounds = self.probe_cost() / (self.s.probe_budget * self.costs.full_step)
    self.plain_left = max(self.backoff, math.ceil(budget_rounds))
    self.backoff = min(2 * self.backoff, self.s.max_backoff_rounds)
    self.draft_segments = 0
    self._restart_refreshes()

  @property
  def trying(self) -> bool:
    """Whether the drafting segment running (until `observe` decides on it) tries a
    neighbouring M."""
    return self.num_skip != self.chosen

  def next_segment(self, decoder, state):
    if self.costs is None:
      since_start = decoder.stopwatch()
      self.costs = cached_costs(decoder, state, self.max_new_tokens, self.s.cost_cache_dir)
      self.calibration_seconds += since_start()
    self.drafting = self.plain_left == 0 and (self.draft_segments > 0
                                              or self.drafting_can_pay())
    if not self.drafting:  # prompt lookup's own rounds, or plain steps without it
      # The rest of the back-off; with none left, drafting cannot pay even at the most
      # optimistic acceptance, and plain rounds teach nothing that could change that: the
      # rest of the generation in one segment (a return to the host costs a few plain steps
      # of a small model).
      return state, Segment(draft=self.s.lookup, rounds=self.plain_left or None,
                            lookup_only=self.s.lookup)
    self.num_skip = self._explore_target()
    # Drafting after plain decoding, or before anything paid, opens with a probe: a few rounds
    # of a few drafts. A generation that follows drafting that paid drafts on at once: a probe
    # there would give up drafts the policy expects to pay.
    self.probing = self.draft_segments == 0 and not self.paying
    since_refresh = decoder.stopwatch()
    state = decoder.refresh(state, self.num_skip)
    self._refresh_seconds = since_refresh()
    self._track_refresh(decoder.skip_in_force)  # the host's copy: no read from the device
    state = state.replace(draft_limit=jax.device_put(np.int32(self._segment_limit())))
    if self.probing:
      return state, Segment(draft=True, rounds=self.s.probe_rounds)
    if self.trying:  # a try teaches enough in one short period
      return state, Segment(draft=True, rounds=self.s.loi)
    if decoder.searches_in_verify:  # the device refreshes in place while the set stays
      return state, Segment(draft=True, rounds=self.s.longest_period,
                            refresh_every=refresh_period(self.s.loi, decoder))
    return state, Segment(draft=True, rounds=self.interval)

  def observe(self, accepted_R, drafted_R, source_R, seconds=None):
    source_R = np.asarray(source_R)
    if not self.drafting:  # lookup or plain rounds only: nothing about M to learn
      # What is left of a back-off at a generation's end carries over.
      self.plain_left = max(self.plain_left - int(np.sum(source_R != LOOKUP)), 0)
      return
    skipped_R = source_R == SKIP
    if not skipped_R.any():
      return  # the generation ended before a round drafted with this skip set
    if self.probing and seconds is not None:  # its refresh and rounds, and the return it adds
      self.probe_seconds = max(self._refresh_seconds + seconds
                               - len(source_R) * self.costs.full_step, 0.0) + self.costs.segment
    tally, limit = self.tallies.setdefault(self.num_skip, _Tally()), self._segment_limit()
    for accepted, drafted in zip(np.asarray(accepted_R)[skipped_R],
                                 np.asarray(drafted_R)[skipped_R]):
      tally.add(int(accepted) - 1, int(drafted), limit, self.s.decay)
    self.draft_segments += 1
    if not self.trying:
      self.since_try += int(skipped_R.sum())
    # The next drafting (now, or the probe after a back-off) tries the most promising M,
    # whether or not it is expected to pay now: a probe at an M that just failed teaches less.
    # It stays at the current M unless another is clearly better: a new M costs a refresh
    # and restarts the refresh interval.
    observed = self._observed()
    K = self.s.num_draft_tokens
    best, speedup = best_num_skip(observed, self.costs, self.L, self.interval, K)
    current, current_speedup = best_num_skip({self.chosen: observed[self.chosen]}, self.costs,
                                             self.L, self.interval, K)
    if current_speedup * (1.0 + self.s.switch_margin) >= speedup:
      best, speedup = current, current_speedup
    if self.trying:
      moved = best[0] != self.chosen
      self.explore_gap = (self.s.explore_every if moved
                          else min(2 * self.explore_gap, self.s.max_explore_every))
    self.chosen, self.draft_limit = best
    if speedup > 1.0 + self.s.margin:
      self.backoff = self.s.backoff_rounds
      self.paying = True
    else:  # drafting does not pay now: decode plainly, then probe again
      self._go_plain()


@dataclasses.dataclass(frozen=True)
class AdaptiveClasp(layer_skip.LayerSkipDrafting, Strategy):
  """CLaSp whose number of skipped layers M is chosen online (`--skip_layers=auto`).

  Attributes:
    candidates: the values of M considered, ascending (the DP is compiled for the largest).
    initial_skip_layers: M for the first rounds (one of the candidates).
    num_draft_tokens: K.
    draft_exit_threshold: DET.
    lookup: take a round's K drafts from the context when it has an n-gram match (prompt
      lookup): a copied draft costs nothing to make, so such a round is never slower than a
      plain step, and the policy's choice is then only what a round without a match does
      (draft with M layers skipped, or a plain step). False: the paper's CLaSp.
    loi: rounds per DP refresh (one drafting segment) after a refresh that changed the skip
      set.
    max_loi: the most rounds per refresh (never fewer than `loi`), reached by doubling while
      refreshes keep the set.
    probe_rounds: rounds of the probe that opens a stretch of drafting (after plain decoding,
      or at a generation's start unless the drafting before it paid), decided on before
      drafting on.
    probe_drafts: the most drafts per probe round: probing costs little where nothing pays.
    explore_every: rounds drafted at the chosen M before a neighbouring M is tried (for LOI
      rounds); the gap doubles while tries leave the choice where it was.
    max_explore_every: the longest gap between tries.
    backoff_rounds: plain rounds before drafting is probed again (doubles while it keeps
      not paying, up to `max_backoff_rounds`).
    max_backoff_rounds: the longest back-off.
    probe_budget: the most a probe that finds nothing may cost, as a fraction of the plain
      rounds before it: a back-off lasts at least a probe's cost (as the last one was timed;
      `AdaptivePolicy.probe_cost`) over this fraction of a plain step, so that where drafting
      never pays, probing keeps `auto` within about this fraction of plain decoding.
    decay: weight kept by older observations per new one (tracks changing text).
    prior_alpha: acceptance rate assumed before observing (pseudo-counts below).
    prior_weight: pseudo-count of the prior.
    optimism: standard errors added to each observed acceptance rate when choosing (see
      `_Tally.estimate`).
    optimistic_alpha: the acceptance rate assumed when deciding whether probing could pay.
    margin: required expected gain over plain decoding.
    switch_margin: the expected gain over the current M another M must offer to be chosen.
    cost_cache_dir: where measured costs are remembered (None: measure every process).
    dp_in_verify: fill the DP's table inside the verify passes (see `clasp.Clasp`).
  """

  candidates: tuple[int, ...] = (1, 2, 4, 6, 8)
  initial_skip_layers: int = 2
  num_draft_tokens: int = 8
  draft_exit_threshold: float = 0.7
  lookup: bool = True
  loi: int = 4
  max_loi: int = 32
  probe_rounds: int = 2
  probe_drafts: int = 2
  explore_every: int = 32
  max_explore_every: int = 1024
  backoff_rounds: int = 32
  max_backoff_rounds: int = 1024
  probe_budget: float = 0.01
  decay: float = 0.95
  prior_alpha: float = 0.5
  prior_weight: float = 2.0
  optimism: float = 1.0
  optimistic_alpha: float = 0.9
  margin: float = 0.0
  switch_margin: float = 0.05
  cost_cache_dir: str | None = None
  dp_in_verify: bool = True
  reads_hidden_states = True  # the DP's input

  @property
  def name(self) -> str:
    return 'clasp'

  def search_columns(self, config):
    del config
    return self.max_skip_layers + 1 if self.dp_in_verify else 0

  @property
  def longest_period(self) -> int:
    """The most rounds drafted between two returns to the host (`max_loi`, never fewer
    than `loi`)."""
    return max(self.loi, self.max_loi)

  @property
  def max_skip_layers(self) -> int:
    return self.candidates[-1]

  def skip_counts(self, config):
    return self.candidates

  def validate(self, config):
    self.validate_drafting()
    grid = self.candidates
    if not grid or list(grid) != sorted(set(grid)) or not 1 <= grid[0] <= grid[-1] < \
        config.num_layers:
      raise ValueError(f'candidates must be distinct values of M in [1, L) = [1, '
                       f'{config.num_layers}), ascending; got {grid}')
    if self.initial_skip_layers not in grid:
      raise ValueError(f'initial_skip_layers ({self.initial_skip_layers}) must be one of the '
                       f'candidates {grid}')
    if self.loi < 1:
      raise ValueError(f'loi must be >= 1, got {self.loi}')
    if not 0.0 < self.probe_budget <= 1.0:
      raise ValueError(f'probe_budget must be in (0, 1], got {self.probe_budget}')
    if self.probe_rounds < 1:
      raise ValueError(f'probe_rounds must be >= 1, got {self.probe_rounds}')

  def refresh(self, params, config, state, num_skip, attention=attention_lib.prefix_attention):
    table_LJ = clasp_dp_table(params, config, state.cache, state.target_hidden_LD,
                              self.max_skip_layers, attention=attention)
    return backtrack(table_LJ, num_skip)  # one compiled DP serves every M

  def make_policy(self, decoder, max_new_tokens):
    policy = getattr(decoder, 'adaptive_policy', None)
    if policy is None:
      policy = decoder.adaptive_policy = AdaptivePolicy(self, decoder.config.num_layers)
    policy.start_generation(max_new_tokens)
    return policy
