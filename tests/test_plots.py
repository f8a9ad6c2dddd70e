"""The benchmark's figures: written from a hand-made run, as valid, non-trivial PNGs."""

import json

import pytest

from clasp_jax.bench import plots
from clasp_jax.bench import specbench

NUM_LAYERS = 12
_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _answer(question_id, category, method, wall_time, accept_lengths, skip_sets):
  """A one-turn answer of 1 + sum(accept_lengths) tokens, in the writer's format."""
  new_tokens = 1 + sum(accept_lengths)
  return {'question_id': question_id, 'category': category, 'model_id': 'm', 'method': method,
          'choices': [{'index': 0, 'turns': ['t'], 'new_tokens': [new_tokens],
                       'wall_time': [wall_time], 'accept_lengths': accept_lengths,
                       'decoding_steps': [len(accept_lengths) + 1],
                       'token_ids': [list(range(new_tokens))], 'skip_sets': [skip_sets]}],
          'tstamp': 0.0}


def _clasp_answer(question_id, category, rounds):
  """Accepted lengths cycling 1..4; the skip set drifts by one layer each round."""
  accepted = [1 + r % 4 for r in range(rounds)]
  skip_sets = [sorted({2 + r % 3, 5, 7 + r % 4}) for r in range(rounds)]
  return _answer(question_id, category, 'clasp', 0.5, accepted, skip_sets)


@pytest.fixture
def answer_dir(tmp_path):
  """vanilla and clasp answers to two writing (mt_bench) and two qa questions."""
  vanilla = [_answer(q, c, 'vanilla', 1.0, [1] * 40, []) for q, c in
             [(1, 'writing'), (2, 'writing'), (3, 'qa'), (4, 'qa')]]
  clasp = [_clasp_answer(1, 'writing', 16), _clasp_answer(2, 'writing', 30),
           _clasp_answer(3, 'qa', 12), _clasp_answer(4, 'qa', 50)]
  for method, answers in [('vanilla', vanilla), ('clasp', clasp)]:
    (tmp_path / f'{method}.jsonl').write_text(''.join(json.dumps(a) + '\n' for a in answers))
  return tmp_path


def test_write_plots_writes_three_pngs(answer_dir):
  methods = ['vanilla', 'clasp']
  summary = specbench.summarize(answer_dir, methods)
  paths = plots.write_plots(answer_dir, summary, methods, NUM_LAYERS)
  assert [p.name for p in paths] == ['speedup.png', 'tau.png', 'skip_heatmap.png']
  for path in paths:
    data = path.read_bytes()
    assert data.startswith(_PNG_MAGIC), path
    assert len(data) > 10_000, path  # Axes, bars and labels, not a blank canvas.


def test_skip_heatmap_rejects_an_unanswered_question(answer_dir, tmp_path):
  with pytest.raises(ValueError, match='no answer to question 9'):
    plots.plot_skip_heatmap(answer_dir / 'clasp.jsonl', 9, tmp_path / 'x.png', NUM_LAYERS)
