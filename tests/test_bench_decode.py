"""`clasp_jax.bench.decode`'s worker plumbing (the measurements themselves need minutes)."""

import dataclasses
import os
import types

from clasp_jax.bench import decode

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_each_row_reaches_on_row_as_the_worker_reports_it():
  """`scripts/bench_decode.py` rewrites its output at every row through `on_row`, so that a
  run stopped by a time limit keeps what it measured: here a case the worker cannot build
  comes back as an error row, through `on_row` and in the returned rows alike."""
  seen = []
  rows = decode.run_engine(_REPO, 'this commit', [decode.Case('broken', 64)],
                           {'broken': {'num_layers': 2}}, dtype='float32', short=1, long=2,
                           reps=1, on_row=seen.append)
  assert rows == seen
  assert [r['preset'] for r in rows] == ['broken'] and rows[0]['error'].startswith('TypeError')


class _FakeDecoder:
  """Generates `per_round` tokens a round, instantly, refreshing the skip set from the host
  every `refresh_every` rounds (never: 0), and logs its calls."""

  def __init__(self, name, per_round, log, refresh_every=0, search_passes=1):
    self.name, self.per_round, self.log = name, per_round, log
    self.refresh_every, self.search_passes = refresh_every, search_passes

  def generate(self, prompt, max_new_tokens):
    del prompt
    self.log.append((self.name, max_new_tokens))
    rounds = -(-max_new_tokens // self.per_round)
    refreshes = rounds // self.refresh_every if self.refresh_every else 0
    return types.SimpleNamespace(token_ids=[0] * max_new_tokens, accept_lengths=[1] * rounds,
                                 refresh_times=[0.0] * refreshes)


def test_interleaved_cases_take_turns_and_keep_their_own_counts(monkeypatch):
  """Cases measured together are timed in turns (after each one's untimed compile), and each
  row's tokens per round are its own case's."""
  log = []
  per_round = {'plain': 1, 'draft': 4, 'refresh': 2}
  monkeypatch.setattr(decode, 'case_strategy', lambda what, config: what)
  monkeypatch.setattr(decode, '_decoder', lambda params, config, what, attention, mesh:
                      _FakeDecoder(what, per_round[what], log))
  config = types.SimpleNamespace(vocab_size=100)
  cases = [decode.Case('tiny', 64, what) for what in per_round]
  rows = decode.measure(cases, None, config, short=4, long=16, reps=2)
  compiles = [(what, n) for what in per_round for n in (4, 16)]
  assert log == compiles + compiles + compiles
  assert [r['tokens_per_round'] for r in rows] == [1.0, 4.0, 2.0]


def test_a_change_and_a_table_are_the_refresh_rows_excess_per_refresh_and_per_table(
    monkeypatch):
  """The refresh row counts the host's refreshes per round, and a skip-set change's cost is
  its excess over the static round per refresh, a DP table's its excess over the rounds one
  table takes: here 2 plain steps a round at one refresh every 4 rounds and a table every 3,
  8 plain steps a change and 6 a table."""
  monkeypatch.setattr(decode, 'case_strategy', lambda what, config: what)
  monkeypatch.setattr(decode, '_decoder', lambda params, config, what, attention, mesh:
                      _FakeDecoder(what, 1, [], refresh_every=4 if what == 'refresh' else 0,
                                   search_passes=3 if what == 'refresh' else 1))
  cases = [decode.Case('tiny', 256, what) for what in ('plain', 'draft', 'refresh')]
  rows = decode.measure(cases, None, types.SimpleNamespace(vocab_size=100), short=16,
                        long=80, reps=1)
  assert [r['refreshes_per_round'] for r in rows] == [0.0, 0.0, 0.25]
  seconds = {'plain': 1.0, 'draft': 3.0, 'refresh': 5.0}  # per round, as if timed
  for case, row in zip(cases, rows):
    row.update(dataclasses.asdict(case), engine='e', device_kind='cpu',
               seconds_per_token=seconds[case.what], seconds_per_round=seconds[case.what])
  refresh = decode.summarize(rows)[2]
  assert refresh['refresh_in_verify_passes'] == 2.0
  assert refresh['table_in_verify_passes'] == 6.0
  assert refresh['change_in_verify_passes'] == 8.0
  assert '| 2.00 | 6.00 | 0.25 | 8.00 |' in decode.markdown(rows)


def test_a_prefill_case_times_one_token_generations_from_a_prompt_of_its_context(
    monkeypatch):
  """A 'prefill' case times 1-token generations from a prompt of its context's length, in
  turns with the decoding cases (which keep their prompts of the context less the long
  budget), and its row and table give the time to the first token alone."""
  log = []

  class Logged(_FakeDecoder):
    def generate(self, prompt, max_new_tokens):
      log.append((self.name, len(prompt), max_new_tokens))
      return super().generate(prompt, max_new_tokens)

  monkeypatch.setattr(decode, 'case_strategy', lambda what, config: what)
  monkeypatch.setattr(decode, '_decoder', lambda params, config, what, attention, mesh:
                      Logged(what, 1, []))
  cases = [decode.Case('tiny', 256, 'plain'), decode.Case('tiny', 256, 'prefill')]
  rows = decode.measure(cases, None, types.SimpleNamespace(vocab_size=100), short=16,
                        long=80, reps=2)
  turn = [('plain', 176, 16), ('plain', 176, 80), ('prefill', 256, 1)]
  assert log == turn * 3
  assert set(rows[1]) == {'seconds_to_first_token'} and rows[1]['seconds_to_first_token'] > 0
  rows[1].update(dataclasses.asdict(cases[1]), engine='e', device_kind='cpu',
                 seconds_to_first_token=0.0125)
  assert decode.markdown(decode.summarize(rows[1:])).splitlines()[-1].endswith(
      '| prefill |  |  |  |  |  |  |  |  | 12.50 |')
