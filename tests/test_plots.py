"""The benchmark's figures: written from a hand-made run, as valid, non-trivial PNGs."""

import json

from matplotlib.text import Text
import pytest

from clasp_jax.bench import plots
from clasp_jax.bench import specbench

NUM_LAYERS = 12
_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _answer(question_id, category, method, wall_time, accept_lengths, skip_sets,
            draft_lengths=None):
  """A one-turn answer of 1 + sum(accept_lengths) tokens, in the writer's format; every round
  drafts 4 tokens unless `draft_lengths` says otherwise."""
  new_tokens = 1 + sum(accept_lengths)
  if draft_lengths is None:
    draft_lengths = [4] * len(accept_lengths)
  return {'question_id': question_id, 'category': category, 'model_id': 'm', 'method': method,
          'choices': [{'index': 0, 'turns': ['t'], 'new_tokens': [new_tokens],
                       'wall_time': [wall_time], 'accept_lengths': accept_lengths,
                       'draft_lengths': draft_lengths,
                       'decoding_steps': [len(accept_lengths) + 1],
                       'token_ids': [list(range(new_tokens))], 'skip_sets': [skip_sets]}],
          'tstamp': 0.0}


def _texts(figure):
  """Every piece of text in a figure: titles, labels, legend entries, annotations."""
  return [t.get_text() for t in figure.findobj(Text)]


def _clasp_answer(question_id, category, rounds):
  """Accepted lengths cycling 1..4; the skip set drifts by one layer each round."""
  accepted = [1 + r % 4 for r in range(rounds)]
  skip_sets = [sorted({2 + r % 3, 5, 7 + r % 4}) for r in range(rounds)]
  return _answer(question_id, category, 'clasp', 0.5, accepted, skip_sets)


@pytest.fixture
def answer_dir(tmp_path):
  """vanilla and clasp answers to two writing (mt_bench) and two qa questions."""
  vanilla = [_answer(q, c, 'vanilla', 1.0, [1] * 40, [], [0] * 40) for q, c in
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


def test_heatmap_shows_the_first_turn_that_drafted_most_and_shades_plain_rounds(answer_dir):
  """Question 4 drafted in the most rounds; two of question 1's rounds decoded plainly."""
  record = json.loads((answer_dir / 'clasp.jsonl').read_text().splitlines()[0])
  record['choices'][0]['draft_lengths'][3:5] = [0, 0]
  lines = (answer_dir / 'clasp.jsonl').read_text().splitlines()
  (answer_dir / 'clasp.jsonl').write_text('\n'.join([json.dumps(record), *lines[1:]]) + '\n')
  assert plots._most_drafted_first_turn(answer_dir / 'clasp.jsonl') == (4, 50)
  texts = _texts(plots.skip_heatmap_figure(answer_dir / 'clasp.jsonl', 1, NUM_LAYERS))
  assert 'Skipped layers per round (dark: skipped; yellow: 2 plain rounds)' in texts


def test_a_clasp_run_that_never_drafted_says_so(tmp_path):
  """No empty white heatmap: the figure says no round drafted, and the bars' legend too."""
  for method, wall_time in [('vanilla', 1.0), ('clasp', 0.96)]:
    answers = [_answer(q, 'qa', method, wall_time, [1] * 20, [], [0] * 20) for q in (1, 2)]
    (tmp_path / f'{method}.jsonl').write_text(''.join(json.dumps(a) + '\n' for a in answers))
  methods = ['vanilla', 'clasp']
  summary = specbench.summarize(tmp_path, methods)
  paths = plots.write_plots(tmp_path, summary, methods, NUM_LAYERS)
  assert [p.name for p in paths] == ['speedup.png', 'tau.png', 'skip_heatmap.png']
  texts = _texts(plots.skip_heatmap_figure(tmp_path / 'clasp.jsonl', 1, NUM_LAYERS))
  assert 'No round drafted:\nevery round decoded plainly,\nskipping no layer' in texts
  assert 'clasp, question 1, first turn (20 rounds: no round drafted)' in texts
  for figure in (plots.speedup_figure(summary), plots.tau_figure(summary)):
    assert 'clasp (no round drafted)' in _texts(figure)
