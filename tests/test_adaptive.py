"""The adaptive skip budget: the M-selection rule, the policy, and losslessness."""

import time
import types

import jax
import numpy as np
import pytest

from clasp_jax import strategies
from clasp_jax.engine import Decoder
from clasp_jax.strategies import adaptive
from clasp_jax.strategies.adaptive import Costs
from clasp_jax.strategies.base import LOOKUP, PLAIN, SKIP, Segment
import tiny

L = 30
# A device where a verify pass costs about one step and a draft step its share of layers.
GPU_LIKE = Costs(full_step=1.0, draft_base=0.05, draft_per_layer=0.95 / L, verify=1.05, dp=0.3)
# A device where a verify pass of K+1 tokens costs several steps (as on a CPU).
CPU_LIKE = Costs(full_step=1.0, draft_base=0.1, draft_per_layer=0.9 / L, verify=3.0, dp=1.5)
# A GPU whose skip-set refresh costs four steps (a large model's DP and switch).
HEAVY_REFRESH = Costs(full_step=1.0, draft_base=0.1, draft_per_layer=0.84 / L, verify=1.0,
                      dp=4.0)


def test_expected_tokens():
  assert adaptive.expected_tokens(0.0, 8) == 1.0
  assert adaptive.expected_tokens(1.0, 8) == 9.0
  assert adaptive.expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_picks_the_m_with_the_highest_expected_rate():
  # Acceptance falls as more layers are skipped; the rate at which a draft step is followed by
  # another (1: rounds draft up to their limit), per M.
  observed = {8: (0.95, 1.0), 15: (0.9, 1.0), 20: (0.7, 0.75)}
  # By hand for M = 15: (1 - 0.9^9) / 0.1 tokens over 8 drafts of 15 layers, a verify pass
  # and an eighth of a DP.
  rate_15 = ((1 - 0.9 ** 9) / 0.1) / (8 * (0.05 + 15 * 0.95 / L) + 1.05 + 0.3 / 8)
  assert adaptive.expected_rate(0.9, 8.0, 15, L, GPU_LIKE, 8) == pytest.approx(rate_15)
  assert rate_15 == pytest.approx(1.159, abs=1e-3)
  rates = {m: adaptive.expected_rate(a, adaptive.expected_drafts(c, 8), m, L, GPU_LIKE, 8)
           for m, (a, c) in observed.items()}
  assert max(rates, key=rates.get) == 15 and rates[8] < rate_15 and rates[20] < rate_15
  # At a = 0.9 the eighth draft is worth less than it costs: M = 15 with 3 drafts a round
  # (1.29 against 1.16 with all 8).
  (best, speedup) = adaptive.best_num_skip(observed, GPU_LIKE, L, loi=8, max_drafts=8)
  assert best == (15, 3) and speedup > rate_15 > 1.0
  assert speedup == pytest.approx(adaptive.expected_rate(0.9, 3, 15, L, GPU_LIKE, 8))
  # The same acceptance with a 3x verify pass (a CPU): no M beats plain decoding.
  assert adaptive.best_num_skip(observed, CPU_LIKE, L, loi=8, max_drafts=8)[1] < 1.0


def test_picks_plain_decoding_when_drafting_cannot_pay():
  observed = {2: (0.7, 0.6), 6: (0.5, 0.5)}
  assert adaptive.best_num_skip(observed, CPU_LIKE, L, loi=4, max_drafts=8)[1] < 1.0
  assert adaptive.best_num_skip({}, GPU_LIKE, L, loi=4, max_drafts=8) is None


def test_expected_drafts():
  assert adaptive.expected_drafts(1.0, 5) == 5.0
  assert adaptive.expected_drafts(0.0, 5) == 1.0
  assert adaptive.expected_drafts(0.5, 3) == pytest.approx(1.75)


class _FakeState:
  """The field of a decode state the policy sets itself."""

  def __init__(self, draft_limit=8, skip_L=None):
    self.draft_limit, self.skip_L = draft_limit, skip_L

  def replace(self, **fields):
    return _FakeState(**{**vars(self), **fields})


class _FakeDecoder:
  """Stands in for the decoder's skip-set calls so the policy can be driven by synthetic
  segments. Its DP returns the same set for an M every time, or, `changing`, a new one;
  `searches_in_verify`: its verify passes fill the DP's table, one complete per pass."""

  def stopwatch(self):  # nothing compiles here: plain seconds since
    started = time.perf_counter()
    return lambda: time.perf_counter() - started

  def __init__(self, changing=False, searches_in_verify=False):
    self.refreshed, self.changing = [], changing
    self.searches_in_verify, self.search_passes = searches_in_verify, 1
    self.skip_in_force = None

  def refresh(self, state, num_skip):
    shift = len(self.refreshed) if self.changing else 0
    self.refreshed.append(num_skip)
    self.skip_in_force = np.zeros(L, bool)
    self.skip_in_force[(np.arange(num_skip) + shift) % (L - 2) + 1] = True
    return state.replace(skip_L=self.skip_in_force)


def _policy(costs, **settings):
  """A policy at these costs; its back-offs are `backoff_rounds` and their doublings alone
  unless a test sets `probe_budget` (at 1.0 every probe here fits its back-off)."""
  settings = dict(dict(candidates=(2, 4, 8, 12), initial_skip_layers=4, lookup=False,
                       probe_budget=1.0), **settings)
  return adaptive.AdaptivePolicy(strategies.AdaptiveClasp(**settings), L, costs)


def _drive(policy, decoder, accepted, drafted, segments, source=SKIP):
  """Runs `segments` segments, every drafting round committing `accepted` tokens of
  `drafted` drafts from `source`; returns each segment's (drafts with layers skipped, rounds)."""
  schedule, state = [], _FakeState()
  for _ in range(segments):
    state, segment = policy.next_segment(decoder, state)
    skipping = segment.kind == 'draft'
    schedule.append((skipping, segment.rounds))
    if skipping:
      policy.observe(np.full(segment.rounds, accepted), np.full(segment.rounds, drafted),
                     np.full(segment.rounds, source))
    else:  # plain steps (the rounds a segment counts; lookup rounds come on top)
      policy.observe(np.ones(segment.rounds), np.zeros(segment.rounds),
                     np.full(segment.rounds, PLAIN))
  return schedule


def test_policy_goes_plain_when_drafts_are_rejected_and_probes_later():
  policy, decoder = _policy(GPU_LIKE, backoff_rounds=8, optimistic_alpha=0.95), _FakeDecoder()
  schedule = _drive(policy, decoder, accepted=1, drafted=4, segments=6)  # all rejected
  probe = (True, policy.s.probe_rounds)
  assert schedule[0] == probe  # the first segment probes
  assert schedule[1] == (False, 8)  # then plain decoding for the back-off
  assert schedule[2] == probe  # drafting is probed again
  assert schedule[3] == (False, 16)  # and the back-off doubles


def test_a_probe_that_finds_nothing_costs_at_most_its_budget_of_the_plain_rounds_before_it():
  """On a small model a probe costs a dozen plain steps (a DP, two returns to the host):
  each back-off is just long enough that the probe after it costs at most `probe_budget` of
  its plain rounds, however short `backoff_rounds` is; within budget, the doubling back-offs
  stay as they were."""
  small = Costs(full_step=1.0, draft_base=0.05, draft_per_layer=0.95 / L, verify=1.1, dp=5.0,
                segment=2.5)
  policy = _policy(small, backoff_rounds=32, probe_budget=0.01, optimistic_alpha=0.99)
  decoder, state = _FakeDecoder(), _FakeState()
  for _ in range(4):
    state, segment = policy.next_segment(decoder, state)
    assert (segment.kind, segment.rounds) == ('draft', policy.s.probe_rounds)
    policy.observe(np.ones(2), np.full(2, 2), np.full(2, SKIP))  # every draft rejected
    # The next probe's cost: a DP, two returns, two rounds of two drafts and a verify pass.
    draft_step = small.draft_step(L - policy.chosen)
    probe_cost = policy.probe_cost()
    assert probe_cost == pytest.approx(5.0 + 2 * 2.5 + 2 * (2 * draft_step + 1.1 - 1.0))
    state, segment = policy.next_segment(decoder, state)
    assert segment.kind == 'plain'
    assert probe_cost <= 0.01 * segment.rounds < probe_cost + 0.01  # full_step is 1
    policy.observe(np.ones(segment.rounds), np.zeros(segment.rounds),
                   np.full(segment.rounds, PLAIN))
  generous = _policy(small, backoff_rounds=32, probe_budget=1.0, optimistic_alpha=0.99)
  schedule = _drive(generous, _FakeDecoder(), accepted=1, drafted=2, segments=4)
  assert [rounds for _, rounds in schedule[1::2]] == [32, 64]


def test_a_timed_probe_sets_the_next_back_off_by_what_it_cost():
  """A probe that took longer than its estimate (a slow DP, a slow return) keeps the next
  probe further away: its time, less a plain step per round, plus the return to the host it
  adds to the plain rounds around it, is the cost the budget bounds."""
  costs = Costs(full_step=1.0, draft_base=0.05, draft_per_layer=0.95 / L, verify=1.1, dp=5.0,
                segment=2.5)
  policy = _policy(costs, backoff_rounds=32, probe_budget=0.01, optimistic_alpha=0.99)
  decoder, state = _FakeDecoder(), _FakeState()
  state, segment = policy.next_segment(decoder, state)  # the probe: 2 rounds
  assert segment.rounds == 2
  policy.observe(np.ones(2), np.full(2, 2), np.full(2, SKIP), seconds=30.0)
  # The refresh took microseconds (the fake decoder's).
  assert policy.probe_cost() == pytest.approx(30.0 - 2 * 1.0 + 2.5, abs=0.01)
  state, segment = policy.next_segment(decoder, state)
  assert segment.kind == 'plain' and 3050 <= segment.rounds <= 3051


def test_policy_never_drafts_when_even_perfect_acceptance_cannot_pay():
  """Each generation is one plain segment, to its end: no probe, no return to the host."""
  hopeless = Costs(full_step=1.0, draft_base=0.9, draft_per_layer=0.01, verify=5.0, dp=5.0)
  policy, decoder = _policy(hopeless), _FakeDecoder()
  for _ in range(3):
    policy.start_generation(max_new_tokens=64)
    _, segment = policy.next_segment(decoder, _FakeState())
    assert (segment.kind, segment.rounds) == ('plain', None)
    policy.observe(np.ones(63), np.zeros(63), np.full(63, PLAIN))
  assert not decoder.refreshed


def test_policy_keeps_drafting_when_it_pays_and_explores_neighbours():
  policy, decoder = _policy(GPU_LIKE, initial_skip_layers=8, explore_every=2), _FakeDecoder()
  schedule = _drive(policy, decoder, accepted=8, drafted=7, segments=12)  # all accepted
  assert all(draft for draft, _ in schedule)
  assert set(decoder.refreshed) > {8}  # neighbouring M values on the grid were tried
  assert set(decoder.refreshed) <= set(policy.s.candidates)


def test_short_generations_still_take_turns_exploring_neighbours():
  """Generations of two drafting segments each, fewer rounds than `explore_every`: the
  neighbours are still tried, the count of rounds carrying over (a margin too high for any
  switch leaves exploring as the only way to another M)."""
  policy, decoder = _policy(GPU_LIKE, initial_skip_layers=8, explore_every=16,
                            switch_margin=10.0), _FakeDecoder()
  for _ in range(8):
    policy.start_generation(max_new_tokens=64)
    assert sum(rounds for _, rounds in _drive(policy, decoder, 8, 7, segments=2)) < 16
  assert set(decoder.refreshed) == {4, 8, 12}
  assert policy.chosen == 8


def test_tries_grow_rarer_while_they_leave_the_choice_where_it_was():
  """Neighbours that do worse than the chosen M: the rounds drafted at it between tries
  double after each try (up to `max_explore_every`); a try that moves the choice brings them
  back to `explore_every`."""
  policy, decoder = _policy(GPU_LIKE, initial_skip_layers=8, explore_every=8,
                            max_explore_every=32, loi=4, max_loi=4), _FakeDecoder()
  state, gaps, since = _FakeState(), [], 0
  for _ in range(40):
    state, segment = policy.next_segment(decoder, state)
    if policy.num_skip != policy.chosen:
      gaps.append(since)
      since = 0
    elif policy.draft_segments:  # after the opening probe
      since += segment.rounds
    accepted = 8 if policy.num_skip == 8 else 2  # worse on both sides of M = 8
    policy.observe(np.full(segment.rounds, accepted), np.full(segment.rounds, 7),
                   np.full(segment.rounds, SKIP))
  assert gaps[:5] == [8, 16, 32, 32, 32]
  assert policy.chosen == 8
  for _ in range(400):  # M = 12 now accepts as M = 8 does, and drafts cheaper
    state, segment = policy.next_segment(decoder, state)
    tried = policy.trying
    accepted = 8 if policy.num_skip in (8, 12) else 2
    policy.observe(np.full(segment.rounds, accepted), np.full(segment.rounds, 7),
                   np.full(segment.rounds, SKIP))
    if policy.chosen == 12:
      break
  assert tried and policy.chosen == 12 and policy.explore_gap == 8


def test_refreshes_grow_rarer_while_the_dp_keeps_the_skip_set():
  probe = (True, 2)
  policy = _policy(GPU_LIKE, candidates=(16,), initial_skip_layers=16, loi=4, max_loi=16)
  schedule = _drive(policy, _FakeDecoder(), accepted=8, drafted=7, segments=6)
  assert schedule == [probe, (True, 8), (True, 16), (True, 16), (True, 16), (True, 16)]
  policy = _policy(GPU_LIKE, candidates=(16,), initial_skip_layers=16, loi=4, max_loi=16)
  schedule = _drive(policy, _FakeDecoder(changing=True), accepted=8, drafted=7, segments=4)
  assert schedule == [probe, (True, 4), (True, 4), (True, 4)]


def test_where_verify_passes_search_segments_end_only_on_a_change():
  """With the DP's table filled by the verify passes, a drafting segment runs up to `max_loi`
  rounds, the device checking every LOI rounds whether a refresh would change the set (as a
  fixed M's segments do); a probe and a try of a neighbouring M run their few rounds."""
  policy = _policy(GPU_LIKE, candidates=(12, 16), initial_skip_layers=16, loi=4, max_loi=32,
                   explore_every=64)
  decoder, state, segments = _FakeDecoder(searches_in_verify=True), _FakeState(), []
  for _ in range(5):
    state, segment = policy.next_segment(decoder, state)
    segments.append((policy.num_skip, segment.rounds, segment.refresh_every))
    policy.observe(np.full(segment.rounds, 8), np.full(segment.rounds, 7),
                   np.full(segment.rounds, SKIP))
  probe, run, try_below = (16, 2, None), (16, 32, 4), (12, 4, None)
  # After 66 rounds at M = 16 a neighbour is tried: the one below, none being above.
  assert segments == [probe, run, run, try_below, run]


def test_a_generation_after_drafting_that_paid_drafts_without_a_probe():
  """The first generation probes; the next, its policy having found drafting to pay, opens
  with a refresh period at the chosen M and draft limit; after a stretch where drafting did
  not pay, drafting opens with a probe again."""
  policy = _policy(GPU_LIKE, candidates=(12,), initial_skip_layers=12, loi=4, backoff_rounds=8)
  decoder = _FakeDecoder(changing=True)  # every refresh changes the set: periods of LOI
  policy.start_generation(max_new_tokens=64)
  assert _drive(policy, decoder, accepted=8, drafted=7, segments=2) == [(True, 2), (True, 4)]
  policy.start_generation(max_new_tokens=64)
  state, segment = policy.next_segment(decoder, _FakeState())
  assert (segment.rounds, state.draft_limit) == (4, policy.draft_limit)
  policy.observe(np.full(64, 1), np.full(64, 8), np.full(64, SKIP))  # every draft rejected
  policy.start_generation(max_new_tokens=64)
  assert _drive(policy, decoder, accepted=8, drafted=7, segments=2) == [(False, 8), (True, 2)]


def test_a_probe_with_every_draft_accepted_drafts_on():
  """Four of four probe drafts accepted are too few samples to rule drafting out: with the
  estimate's optimism the policy drafts on, without it the mean (0.83) sends it plain."""
  for optimism, after_probe in ((1.0, (True, 8)), (0.0, (False, 32))):
    policy = _policy(HEAVY_REFRESH, candidates=(16,), initial_skip_layers=16,
                     optimism=optimism)
    schedule = _drive(policy, _FakeDecoder(), accepted=3, drafted=2, segments=2)
    assert schedule == [(True, 2), after_probe]


def test_after_a_failed_try_the_next_probe_goes_to_the_most_promising_m():
  policy, decoder = _policy(HEAVY_REFRESH, candidates=(4, 19), initial_skip_layers=4,
                            backoff_rounds=8), _FakeDecoder()
  state, segment = policy.next_segment(decoder, _FakeState())  # the probe, at M = 4
  policy.observe(np.full(2, 3), np.full(2, 2), np.full(2, SKIP))  # every draft accepted
  state, segment = policy.next_segment(decoder, state)
  assert decoder.refreshed == [4, 19]  # untried M = 19 is expected to do as well, cheaper
  policy.observe(np.full(4, 1), np.full(4, 8), np.full(4, SKIP))  # every draft rejected
  state, segment = policy.next_segment(decoder, state)  # plain: M = 4 does not pay either
  assert not segment.draft
  policy.observe(np.ones(segment.rounds), np.zeros(segment.rounds),
                 np.full(segment.rounds, PLAIN))
  policy.next_segment(decoder, state)
  assert decoder.refreshed == [4, 19, 4]  # the probe goes back to where drafts were accepted


def test_switches_m_only_for_a_clear_gain():
  """M = 16 drafts each token a layer cheaper than M = 15 (about 5% a round, at the acceptance
  seen at 15): worth a switch at a margin of 0, not at 0.1."""
  for switch_margin, ms in ((0.0, {15, 16}), (0.1, {15})):
    policy, decoder = _policy(GPU_LIKE, candidates=(15, 16), initial_skip_layers=15,
                              explore_every=100, switch_margin=switch_margin), _FakeDecoder()
    _drive(policy, decoder, accepted=8, drafted=7, segments=4)
    assert set(decoder.refreshed) == ms


def test_with_lookup_plain_stretches_take_lookup_drafts_and_teach_nothing():
  """With prompt lookup on, the back-off runs drafting segments with layer-skip drafts turned
  off (lookup drafts or plain steps), and rounds that a lookup drafted do not count for M."""
  policy, decoder = _policy(GPU_LIKE, lookup=True, backoff_rounds=8,
                            optimistic_alpha=0.95), _FakeDecoder()
  schedule = _drive(policy, decoder, accepted=1, drafted=4, segments=3)  # skip drafts rejected
  probe = (True, policy.s.probe_rounds)
  assert schedule[:3] == [probe, (False, 8), probe]
  tallies = {m: t.rounds for m, t in policy.tallies.items()}
  # Lookup rounds in a drafting segment leave the estimates as they were.
  policy.next_segment(decoder, _FakeState())
  policy.observe(np.full(4, 9), np.full(4, 8), np.full(4, LOOKUP))
  assert {m: t.rounds for m, t in policy.tallies.items()} == tallies


def test_lookup_rounds_between_layer_skip_rounds_leave_drafting_paying():
  """With prompt lookup on, a drafting segment runs its rounds drafted with layers skipped and
  any lookup rounds between them (`Segment.rounds` does not count those), so its refresh is
  paid for by the rounds that use it however many lookup rounds come between: layer-skip
  drafts that pay keep paying when lookup takes three rounds in four."""
  costly_dp = Costs(full_step=1.0, draft_base=0.05, draft_per_layer=0.5 / L, verify=1.0,
                    dp=8.0)
  kinds = {}
  for lookups_per_skip in (0, 3):
    policy = _policy(costly_dp, lookup=True, candidates=(16,), initial_skip_layers=16,
                     loi=4, max_loi=4)
    decoder, state, kinds[lookups_per_skip] = _FakeDecoder(), _FakeState(), []
    for _ in range(8):
      state, segment = policy.next_segment(decoder, state)
      kinds[lookups_per_skip].append(segment.kind)
      source_R = np.repeat([[SKIP] + [LOOKUP] * lookups_per_skip], segment.rounds, 0).ravel()
      if segment.kind != 'draft':
        source_R = np.where(source_R == SKIP, PLAIN, LOOKUP)
      policy.observe(np.where(source_R == SKIP, 9, 3), np.where(source_R == SKIP, 8, 2),
                     source_R)
  assert kinds[0] == kinds[3] == ['draft'] * 8


def test_a_draft_limit_set_low_rises_again_when_drafts_get_accepted():
  """While a draft is accepted with probability 0.6, one or two drafts pay best and the
  policy limits rounds to that; once every draft is accepted, the limit goes back up to K.
  The rounds it cut short say nothing of how far drafting would go (the threshold never
  stopped one), so they must not be taken for what drafting does: that kept the limit low."""
  policy, decoder = _policy(GPU_LIKE, candidates=(20,), initial_skip_layers=20), _FakeDecoder()
  state, limits, rng = _FakeState(), [], np.random.RandomState(0)
  for acceptance in [0.6] * 8 + [1.0] * 12:
    state, segment = policy.next_segment(decoder, state)
    assert segment.kind == 'draft'  # drafting pays in both stretches
    drafted = min(int(state.draft_limit), policy.s.num_draft_tokens)  # never stopped early
    leading_R = (rng.geometric(1.0 - acceptance, segment.rounds) - 1 if acceptance < 1
                 else np.full(segment.rounds, drafted))  # accepted drafts, were there no limit
    policy.observe(1 + np.minimum(leading_R, drafted), np.full(segment.rounds, drafted),
                   np.full(segment.rounds, SKIP))
    limits.append(policy.draft_limit)
  assert max(limits[4:8]) <= 2
  assert limits[-1] == policy.s.num_draft_tokens


def test_untried_larger_m_is_expected_to_do_as_well_as_a_smaller_m_tried():
  """Drafting pays at the first M, so the policy moves on to try larger (cheaper) ones."""
  policy, decoder = _policy(GPU_LIKE, initial_skip_layers=2, explore_every=100), _FakeDecoder()
  _drive(policy, decoder, accepted=8, drafted=7, segments=6)
  assert decoder.refreshed[0] == 2 and max(decoder.refreshed) > 2


def test_an_untried_m_is_judged_by_the_nearest_smaller_m_tried():
  """Drafts are accepted up to M = 15 and rejected beyond (a planted model's cliff): after the
  largest M fails, the M just below it is tried, not written off with it, and kept."""
  policy, decoder = _policy(GPU_LIKE, candidates=(8, 15, 16), initial_skip_layers=8,
                            explore_every=100), _FakeDecoder()
  state = _FakeState()
  for _ in range(6):
    state, segment = policy.next_segment(decoder, state)
    assert segment.kind == 'draft'
    accepted, drafted = (8, 7) if policy.num_skip <= 15 else (1, 4)
    policy.observe(np.full(segment.rounds, accepted), np.full(segment.rounds, drafted),
                   np.full(segment.rounds, SKIP))
  assert decoder.refreshed[:3] == [8, 16, 15]  # all untried M looked as good as 8 at first
  assert set(decoder.refreshed[3:]) == {15}


@pytest.mark.parametrize('pass_width', [5, 16])  # 16: the DP rides in the verify passes
def test_auto_is_lossless_and_reports_m_per_round(pass_width):
  config = tiny.tiny_config()
  params = tiny.tiny_params(config)
  prompt = np.random.RandomState(1).randint(4, config.vocab_size, 20).tolist()
  expected = Decoder(params, config, strategies.Vanilla()).generate(prompt, 40).token_ids
  strategy = strategies.build('clasp', config, skip_layers='auto', num_draft_tokens=4,
                              draft_exit_threshold=0.0)
  assert isinstance(strategy, strategies.AdaptiveClasp)
  decoder = Decoder(params, config, strategy, pass_width=pass_width)
  assert decoder.searches_in_verify == (pass_width == 16)
  tiny.set_costs(decoder, GPU_LIKE)
  out = decoder.generate(prompt, 40)
  assert out.token_ids == expected
  per_round = out.skip_layers_per_round
  assert len(per_round) == len(out.accept_lengths)
  assert all(m is None or m in strategy.candidates for m in per_round)
  assert any(m is not None for m in per_round)
  assert decoder.adaptive_policy.probe_seconds is not None  # the engine timed the probe


def test_measured_costs_split_a_round_into_its_pieces(monkeypatch):
  """`measure_costs` recovers the costs behind its segments' times where a drafting round's
  verify pass costs more than a plain step (the DP's bands in it) and the larger M drafts
  fewer tokens a round: the extra is a round's, not its draft steps'."""
  config = tiny.tiny_config()
  num_layers = config.num_layers
  truth = Costs(full_step=1.0, draft_base=0.1, draft_per_layer=0.15, verify=1.3, dp=0.0,
                segment=2.2)

  def timed_segment(decoder, state, segment, max_new_tokens, repeats=1):
    del decoder, max_new_tokens, repeats
    rounds = segment.rounds
    if not segment.draft:
      return truth.segment + rounds * truth.full_step, rounds, 0
    active = num_layers - int(np.sum(state.skip_L))
    drafts = rounds * min(int(state.draft_limit), 6 if active > 3 else 2)
    seconds = truth.segment + rounds * truth.verify + drafts * truth.draft_step(active)
    return seconds, rounds, drafts

  monkeypatch.setattr(adaptive, '_timed_segment', timed_segment)
  decoder = Decoder(tiny.tiny_params(config), config,
                    strategies.AdaptiveClasp(candidates=(1, 4), initial_skip_layers=1))
  state = decoder.start(tiny.prompts(config)[0], tiny.MAX_NEW)
  measured = adaptive.measure_costs(decoder, state, tiny.MAX_NEW, (1, 4))
  for field in ('full_step', 'draft_base', 'draft_per_layer', 'verify', 'segment'):
    assert getattr(measured, field) == pytest.approx(getattr(truth, field)), field


def test_measuring_the_costs_is_left_out_of_the_decoding_time(monkeypatch):
  """A decoder's first generation measures the step costs; that time is the generation's
  `calibration_seconds`, out of its decoding speed as compilation is, and a later generation
  of the same decoder pays none."""
  pause = 0.3

  def slow_measure(decoder, state, max_new_tokens, skip_counts):
    del decoder, state, max_new_tokens, skip_counts
    time.sleep(pause)
    return GPU_LIKE

  monkeypatch.setattr(adaptive, 'measure_costs', slow_measure)
  config = tiny.tiny_config()
  decoder = Decoder(tiny.tiny_params(config), config,
                    strategies.build('clasp', config, skip_layers='auto', num_draft_tokens=4))
  prompt = tiny.prompts(config)[0]
  first, second = decoder.generate(prompt, 16), decoder.generate(prompt, 16)
  assert pause <= first.calibration_seconds < pause + 0.2
  assert first.decode_seconds == pytest.approx(
      first.wall_time - first.compile_seconds - first.calibration_seconds)
  assert second.calibration_seconds == 0.0


def test_on_a_cpu_each_measured_segment_runs_once(monkeypatch):
  """On a CPU a segment's first run times as its next does: measuring runs it once, where
  accelerators run it untimed first (their kernels load on a first run)."""
  config = tiny.tiny_config()
  decoder = Decoder(tiny.tiny_params(config), config,
                    strategies.AdaptiveClasp(candidates=(1, 4), initial_skip_layers=1))
  state = decoder.start(tiny.prompts(config)[0], tiny.MAX_NEW)
  runs = []
  run_segment = decoder.run_segment
  monkeypatch.setattr(decoder, 'run_segment', lambda *a: runs.append(1) or run_segment(*a))
  _, rounds, _ = adaptive._timed_segment(decoder, state, Segment(draft=False, rounds=3),
                                         tiny.MAX_NEW)
  assert rounds == 3 and len(runs) == 1


def test_a_repeated_measurement_keeps_the_fastest_run(monkeypatch):
  """A segment measured several times (the 1-round one, whose few milliseconds besides a step
  are `Costs.segment`) reports its fastest run, not a slow first one."""
  config = tiny.tiny_config()
  decoder = Decoder(tiny.tiny_params(config), config, strategies.Vanilla())
  state = decoder.start(tiny.prompts(config)[0], tiny.MAX_NEW)
  segment = Segment(draft=False, rounds=1)
  decoder.compile_segment(state, segment)
  runs = []
  run_segment = decoder.run_segment

  def first_slow(*args):
    if not runs:
      time.sleep(0.5)
    runs.append(1)
    return run_segment(*args)

  monkeypatch.setattr(decoder, 'run_segment', first_slow)
  seconds, rounds, _ = adaptive._timed_segment(decoder, state, segment, tiny.MAX_NEW, repeats=3)
  assert rounds == 1 and len(runs) == 3 + (jax.default_backend() != 'cpu')
  assert seconds < 0.5


def test_cost_table_is_remembered_per_pair_of_measured_m(tmp_path, monkeypatch):
  """A cost cache entry is reused only by a grid that would measure at the same two M."""
  measured = []

  def fake_measure(decoder, state, max_new_tokens, skip_counts):
    measured.append(skip_counts)
    return GPU_LIKE

  monkeypatch.setattr(adaptive, 'measure_costs', fake_measure)
  config = tiny.tiny_config()
  params = tiny.tiny_params(config)

  def costs(candidates):
    decoder = types.SimpleNamespace(
        config=config, params=params, fast_path=False, pass_width=16, plain_width=16,
        logits_by_row=False,
        searches_in_verify=True,
        strategy=strategies.AdaptiveClasp(candidates=candidates,
                                          initial_skip_layers=candidates[0]))
    return adaptive.cached_costs(decoder, None, 32, str(tmp_path))

  assert costs((1, 2, 3)) == GPU_LIKE
  assert costs((2, 3)) == GPU_LIKE  # the same largest M, another smallest
  assert costs((1, 2, 3)) == GPU_LIKE
  assert measured == [(1, 3), (2, 3)]
