"""Spec-Bench protocol: question selection, answer files, resume, and the summary numbers."""

import json

import jax
import numpy as np
import pytest

from clasp_jax import model as model_lib
from clasp_jax import weights
from clasp_jax.bench import hf_reference
from clasp_jax.bench import specbench
from clasp_jax.config import LlamaConfig
from clasp_jax.engine import Generation
from clasp_jax.generation import make_decoder

MAX_NEW_TOKENS = 8

QUESTIONS = [
    {'question_id': 1, 'category': 'writing', 'turns': ['write', 'again']},
    {'question_id': 2, 'category': 'coding', 'turns': ['code', 'fix']},
    {'question_id': 3, 'category': 'qa', 'turns': ['why']},
    {'question_id': 4, 'category': 'qa', 'turns': ['how']},
    {'question_id': 5, 'category': 'rag', 'turns': ['find']},
]


class TinyTokenizer:
  """Letters a-z are ids 3..28; ids 1 and 2 open a user and an assistant turn."""

  eos_token_ids = ()

  def encode(self, text):
    return [3 + (ord(c) - ord('a')) % 26 for c in text]

  def decode(self, ids, skip_special_tokens=False):
    del skip_special_tokens  # it has no special tokens to show
    return ''.join(chr(ord('a') + i - 3) for i in ids if 3 <= i < 29)

  def apply_chat_template(self, messages):
    ids = []
    for message in messages:
      ids += [1 if message['role'] == 'user' else 2] + self.encode(message['content'])
    return ids + [2]


class RecordingGenerator:
  """Answers 'abc' to everything and records each prompt it was given."""

  def __init__(self):
    self.prompts = []

  def generate(self, prompt_ids, max_new_tokens, seed=0):
    del max_new_tokens, seed
    self.prompts.append(list(prompt_ids))
    return Generation(token_ids=[3, 4, 5], text='abc', prompt_tokens=len(prompt_ids),
                      wall_time=0.5, compile_seconds=0.0, accept_lengths=[1, 1],
                      draft_lengths=[0, 0], draft_sources=['plain', 'plain'],
                      skip_sets=np.zeros((2, 4), bool), refresh_times=[])


@pytest.fixture(scope='module')
def tiny_model():
  config = LlamaConfig(num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
                       intermediate_size=64, vocab_size=32, max_position_embeddings=256)
  params = model_lib.init_params(config, jax.random.key(0), scale=0.2)
  return weights.LoadedModel(config, params, TinyTokenizer(), source='tiny')


@pytest.fixture(scope='module')
def decoders(tiny_model):
  """One decoder per method for the whole module, so each compiles once."""
  return {'vanilla': make_decoder(tiny_model, 'vanilla'),
          'clasp': make_decoder(tiny_model, 'clasp', skip_layers=1, num_draft_tokens=3)}


@pytest.fixture
def question_file(tmp_path):
  path = tmp_path / 'question.jsonl'
  path.write_text(''.join(json.dumps(q) + '\n' for q in QUESTIONS))
  return path


def _without_timing(text):
  """An answer file's records less the fields that differ between runs."""
  records = [json.loads(line) for line in text.splitlines()]
  for record in records:
    del record['tstamp'], record['choices'][0]['wall_time']
  return records


def test_load_questions_takes_the_first_n_of_each_group(question_file):
  picked = specbench.load_questions(question_file, num_questions_per_group=1)
  assert [q['question_id'] for q in picked] == [1, 3, 5]
  picked = specbench.load_questions(question_file, groups=['qa', 'mt_bench'])
  assert [q['question_id'] for q in picked] == [1, 2, 3, 4]


@pytest.mark.parametrize('kwargs, reason', [
    (dict(groups=['chat']), 'unknown group'),
    (dict(num_questions_per_group=0), 'must be >= 1'),
])
def test_load_questions_rejects_bad_selections(question_file, kwargs, reason):
  with pytest.raises(ValueError, match=reason):
    specbench.load_questions(question_file, **kwargs)


def test_second_turn_prompt_holds_the_first_answer_and_new_buckets_are_warmed(
    tiny_model, tmp_path):
  question = {'question_id': 7, 'category': 'writing', 'turns': ['a' * 20, 'b' * 20]}
  generator = RecordingGenerator()
  specbench.run_method(tiny_model, generator, [question], max_new_tokens=4,
                       answer_file=tmp_path / 'fake.jsonl', resume=False, progress=False)
  chat = tiny_model.tokenizer.apply_chat_template
  first = chat([{'role': 'user', 'content': 'a' * 20}])
  second = chat([{'role': 'user', 'content': 'a' * 20}, {'role': 'assistant', 'content': 'abc'},
                 {'role': 'user', 'content': 'b' * 20}])
  # 3 warm-ups and the timed first turn; the second turn's prompt (47 tokens) needs a new
  # 64-token bucket, so it is warmed up once before it is timed.
  assert generator.prompts == [first] * 4 + [second] * 2


def test_answer_file_has_spec_bench_fields(tiny_model, decoders, question_file, tmp_path):
  questions = specbench.load_questions(question_file, num_questions_per_group=1)
  answer_file = tmp_path / 'clasp.jsonl'
  specbench.run_method(tiny_model, decoders['clasp'], questions, max_new_tokens=MAX_NEW_TOKENS,
                       answer_file=answer_file, resume=False, warmup=1, progress=False)
  records = [json.loads(line) for line in answer_file.read_text().splitlines()]
  assert [r['question_id'] for r in records] == [1, 3, 5]
  first = records[0]
  assert (first['category'], first['model_id'], first['method']) == ('writing', 'tiny', 'clasp')
  assert isinstance(first['tstamp'], float)
  (choice,) = first['choices']
  assert choice['index'] == 0
  assert len(choice['turns']) == len(choice['token_ids']) == 2
  assert choice['new_tokens'] == [MAX_NEW_TOKENS] * 2  # The tiny vocabulary has no EOS.
  assert all(t > 0 for t in choice['wall_time'])
  # Spec-Bench's speed.py takes np.mean of one flat list of every round of every turn.
  assert all(isinstance(n, int) for n in choice['accept_lengths'])
  assert len(choice['accept_lengths']) == sum(s - 1 for s in choice['decoding_steps'])
  turns = specbench.turn_accept_lengths(first)
  assert [sum(accepted) for accepted in turns] == [MAX_NEW_TOKENS - 1] * 2  # Prefill: 1 token.
  for accepted, skip_sets in zip(turns, choice['skip_sets']):
    assert len(skip_sets) == len(accepted)
    assert all(len(layers) == 1 and 0 <= layers[0] < 4 for layers in skip_sets)  # M = 1.
  drafts = specbench.turn_draft_lengths(first)
  assert [len(d) for d in drafts] == [len(a) for a in turns]
  assert all(0 <= n <= 3 for turn in drafts for n in turn) and any(n for n in drafts[0])  # K = 3
  assert choice['turns'][0] == TinyTokenizer().decode(choice['token_ids'][0])


def test_resume_after_a_killed_run_gives_the_uninterrupted_answers(
    tiny_model, decoders, question_file, tmp_path):
  questions = specbench.load_questions(question_file, num_questions_per_group=1)
  run = dict(max_new_tokens=MAX_NEW_TOKENS, warmup=0, progress=False)
  full = tmp_path / 'full' / 'clasp.jsonl'
  specbench.run_method(tiny_model, decoders['clasp'], questions, answer_file=full,
                       resume=False, **run)
  lines = full.read_text().splitlines(keepends=True)
  killed = tmp_path / 'killed' / 'clasp.jsonl'
  killed.parent.mkdir()
  killed.write_text(lines[0] + lines[1][:len(lines[1]) // 2])
  specbench.run_method(tiny_model, decoders['clasp'], questions, answer_file=killed,
                       resume=True, **run)
  assert _without_timing(killed.read_text()) == _without_timing(full.read_text())
  assert killed.read_text().splitlines(keepends=True)[0] == lines[0]


def test_resume_rejects_a_corrupt_answer_file(tiny_model, tmp_path):
  answer_file = tmp_path / 'vanilla.jsonl'
  answer_file.write_text('{"question_id": 1, "method": "vanilla"\n{}\n')
  with pytest.raises(ValueError, match='not valid JSON'):
    specbench.run_method(tiny_model, RecordingGenerator(), QUESTIONS, max_new_tokens=4,
                         answer_file=answer_file, resume=True, progress=False)


def test_clasp_matches_vanilla_on_the_tiny_model(tiny_model, decoders, question_file, tmp_path):
  questions = specbench.load_questions(question_file, num_questions_per_group=1)
  for method, decoder in decoders.items():
    specbench.run_method(tiny_model, decoder, questions, max_new_tokens=MAX_NEW_TOKENS,
                         answer_file=tmp_path / f'{method}.jsonl', resume=False, warmup=0,
                         progress=False)
  summary = specbench.summarize(tmp_path, ['vanilla', 'clasp'])
  assert summary['clasp']['overall']['identical_to_vanilla'] == 3
  assert summary['clasp']['overall']['drafting_rounds'] > 0
  assert summary['vanilla']['overall']['tau'] == 1.0
  assert summary['vanilla']['overall']['drafting_rounds'] == 0
  vanilla = specbench.read_answers(tmp_path / 'vanilla.jsonl')
  assert all(r['choices'][0]['skip_sets'] == [[]] * len(r['choices'][0]['turns'])
             for r in vanilla)  # Nothing skipped, nothing recorded.


def _answer(question_id, category, new_tokens, wall_time, accept_lengths, token_ids,
            drafts=4):
  """An answer record; `accept_lengths` is given per turn and stored flat, as the writer does;
  every round drafted `drafts` tokens."""
  return {'question_id': question_id, 'category': category, 'model_id': 'm', 'method': 'x',
          'choices': [{'index': 0, 'turns': ['t'] * len(new_tokens), 'new_tokens': new_tokens,
                       'wall_time': wall_time,
                       'accept_lengths': [n for turn in accept_lengths for n in turn],
                       'draft_lengths': [drafts for turn in accept_lengths for _ in turn],
                       'decoding_steps': [len(a) + 1 for a in accept_lengths],
                       'token_ids': token_ids, 'skip_sets': [[] for _ in accept_lengths]}],
          'tstamp': 0.0}


def _write_answers(path, answers):
  path.write_text(''.join(json.dumps(a) + '\n' for a in answers))


def test_summarize_by_hand(tmp_path):
  _write_answers(tmp_path / 'vanilla.jsonl', [
      _answer(1, 'writing', [10, 10], [1.0, 1.0], [[1] * 9, [1] * 9], [[1], [2]], 0),  # 10 tok/s
      _answer(2, 'qa', [20], [1.0], [[1] * 19], [[3]], 0),  # 20 tok/s
      _answer(3, 'qa', [30], [2.0], [[1] * 29], [[4]], 0),  # 15 tok/s
  ])
  _write_answers(tmp_path / 'clasp.jsonl', [
      _answer(1, 'writing', [10, 10], [0.5, 0.5], [[3, 3, 3], [4, 4, 1]], [[1], [2]]),  # 20
      _answer(2, 'qa', [20], [0.4], [[5, 5, 5, 4]], [[3]]),  # 50 tok/s
      _answer(3, 'qa', [30], [1.5], [[2] * 14 + [1]], [[5]]),  # 20 tok/s, differs
      _answer(4, 'rag', [5], [1.0], [[5]], [[6]]),  # Vanilla has no answer: left out.
  ])
  summary = specbench.summarize(tmp_path, ['vanilla', 'clasp'], header='# settings\n\n')
  clasp = summary['clasp']
  assert list(clasp) == ['mt_bench', 'qa', 'overall']
  assert clasp['overall']['tokens_per_second'] == pytest.approx(90 / 3)
  # Spec-Bench's speedup is a ratio of mean speeds (2.0 here), not a mean of ratios (1.94).
  assert clasp['overall']['speedup'] == pytest.approx((90 / 3) / (45 / 3))
  assert clasp['qa']['speedup'] == pytest.approx(35 / 17.5)
  assert clasp['mt_bench']['speedup'] == pytest.approx(2.0)
  assert clasp['overall']['tau'] == pytest.approx(66 / 25)
  assert clasp['mt_bench']['tau'] == pytest.approx(18 / 6)
  assert (clasp['overall']['identical_to_vanilla'], clasp['overall']['total']) == (2, 3)
  assert (clasp['qa']['identical_to_vanilla'], clasp['qa']['total']) == (1, 2)
  first = specbench.read_answers(tmp_path / 'clasp.jsonl')[0]
  assert specbench.turn_accept_lengths(first) == [[3, 3, 3], [4, 4, 1]]
  vanilla = summary['vanilla']['overall']
  assert (vanilla['speedup'], vanilla['tau'], vanilla['identical_to_vanilla']) == (1.0, 1.0, 3)
  assert json.loads((tmp_path / 'summary.json').read_text()) == summary
  table = (tmp_path / 'summary.md').read_text()
  assert table.startswith('# settings\n\n| method |')
  assert '| clasp | overall | 3 | 30.0 | 2.00x | 2.64 | 2/3 |  |' in table.splitlines()
  assert clasp['overall']['drafting_rounds'] == 25
  assert '(plain)' not in table  # Vanilla decodes plainly by design: no note.


def test_summary_marks_a_method_that_never_drafted(tmp_path):
  """A drafting method that decoded plainly throughout is marked, not shown as a plain win;
  answer files from before draft lengths were recorded get no mark."""
  vanilla = [_answer(q, 'qa', [20], [1.0], [[1] * 19], [[q]], 0) for q in (1, 2)]
  plain = [_answer(q, 'qa', [20], [0.96], [[1] * 19], [[q]], 0) for q in (1, 2)]
  old = [_answer(q, 'qa', [20], [0.96], [[1] * 19], [[q]]) for q in (1, 2)]
  for answer in old:
    del answer['choices'][0]['draft_lengths']
  for method, answers in [('vanilla', vanilla), ('clasp', plain), ('pld', old)]:
    _write_answers(tmp_path / f'{method}.jsonl', answers)
  summary = specbench.summarize(tmp_path, ['vanilla', 'clasp', 'pld'])
  assert summary['pld']['overall']['drafting_rounds'] is None
  lines = specbench.format_table(summary).splitlines()
  assert '| clasp | overall | 2 | 20.8 | 1.04x (plain) | 1.00 | 2/2 |  |' in lines
  assert '| pld | overall | 2 | 20.8 | 1.04x | 1.00 | 2/2 |  |' in lines
  assert lines[-1] == specbench.PLAIN_NOTE


def test_hf_reference_matches_vanilla(tiny_hf_checkpoint):
  model = weights.load(tiny_hf_checkpoint, dtype='float32')
  reference = hf_reference.load_reference(model)
  prompt_ids = model.tokenizer.encode('the sky is')
  expected = make_decoder(model, 'vanilla').generate(prompt_ids, MAX_NEW_TOKENS)
  generation = reference.generate(prompt_ids, MAX_NEW_TOKENS)
  assert generation.token_ids == expected.token_ids
  assert generation.text == expected.text
  assert generation.accept_lengths == [1] * (len(generation.token_ids) - 1)


def test_interleaved_run_gives_the_answers_of_separate_runs(tiny_model, decoders, question_file,
                                                            tmp_path):
  questions = specbench.load_questions(question_file, num_questions_per_group=1)
  run = dict(max_new_tokens=MAX_NEW_TOKENS, warmup=0, progress=False)
  specbench.run_interleaved(tiny_model, decoders, questions, out_dir=tmp_path / 'mixed',
                            resume=False, **run)
  for method, decoder in decoders.items():
    separate = tmp_path / 'separate' / f'{method}.jsonl'
    specbench.run_method(tiny_model, decoder, questions, answer_file=separate, resume=False,
                         **run)
    mixed = specbench.answer_path(tmp_path / 'mixed', method)
    assert _without_timing(mixed.read_text()) == _without_timing(separate.read_text())


def test_method_variants_get_portable_answer_file_names(tmp_path):
  assert specbench.answer_path(tmp_path, 'clasp:skip_layers=4').name == 'clasp+skip_layers=4.jsonl'
  assert specbench.answer_path(tmp_path, 'pld') == tmp_path / 'pld.jsonl'
