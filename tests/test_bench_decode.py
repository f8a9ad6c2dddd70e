"""`clasp_jax.bench.decode`'s worker plumbing (the measurements themselves need minutes)."""

import os

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
