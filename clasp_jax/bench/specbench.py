"""Spec-Bench (Xia et al., 2024): question selection, timed answering, and the summary.

The protocol: batch 1, chat-formatted prompts, warm-up generations before timing, each turn
timed from its prompt ids to its last token (prefill included). MT-Bench questions have two
turns; the second turn's prompt is the chat so far, the first answer included. Each method's
answers go to one JSON line per question, written as soon as the question is done, so a killed
run can resume. Speedup is Spec-Bench's: the mean over questions of a method's tokens/s divided
by the same mean for vanilla decoding.

An answer's `accept_lengths` is one flat list, every round of every turn in order, as Spec-Bench's
`evaluation/speed.py` reads it; turn t holds `decoding_steps[t] - 1` of its rounds (see
`turn_accept_lengths`). Besides Spec-Bench's fields, each turn keeps its token ids (to check
losslessness), the skip set in force in each of its rounds (for the skip-set heatmap), and
`draft_lengths`, flat like `accept_lengths` (0: a round that decoded plainly, without drafts),
so that the summary can tell a method that never drafted from one that drafted in vain.

A decoder compiles once per padded prompt length (its "bucket") and cache capacity, so before
each timed turn everything the turn may run is compiled, untimed (`Decoder.compile`, which on a
GPU also runs each new program once: a program's first run costs more than later ones; a
generator without it, the transformers reference, gets one untimed generation per new bucket
instead): no timed turn includes compilation or a program's first run.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
import dataclasses
import gc
import json
import os
from pathlib import Path
import statistics
import time
from typing import Any, Protocol

import numpy as np
import tqdm

from clasp_jax.engine import Generation, prompt_bucket
from clasp_jax.strategies.base import DRAFT_SOURCES
from clasp_jax.generation import encode_prompt
from clasp_jax.weights import LoadedModel

MT_BENCH_CATEGORIES = ('writing', 'roleplay', 'reasoning', 'math', 'coding', 'extraction', 'stem',
                       'humanities')
GROUPS = ('mt_bench', 'translation', 'summarization', 'qa', 'math_reasoning', 'rag')
OVERALL = 'overall'
BASELINE = 'vanilla'
HF = 'hf'  # The transformers reference (`hf_reference`).
# Methods that decode plainly by design: for them a round without drafts is no news.
_PLAIN_METHODS = (BASELINE, HF)
PLAIN_NOTE = ('(plain): no round drafted. The method decoded plainly, the same computation as '
              'vanilla, so its speedup is timing noise and overhead, not a gain from drafting.')


class Generator(Protocol):
  """What `run_method` times: a `Decoder`, or the transformers reference."""

  def generate(self, prompt_ids: list[int], max_new_tokens: int, seed: int = 0) -> Generation:
    ...


def group_of(category: str) -> str:
  """The Spec-Bench group of a question category (the MT-Bench categories form one group)."""
  return 'mt_bench' if category in MT_BENCH_CATEGORIES else category


def load_questions(path: str | os.PathLike, num_questions_per_group: int | None = None,
                   groups: Sequence[str] | None = None) -> list[dict]:
  """Reads a Spec-Bench question file and picks a balanced subset.

  Args:
    path: a JSON-lines file of {"question_id", "category", "turns"[, "reference"]}.
    num_questions_per_group: keep the first N questions of each group (file order); None: all.
    groups: keep only these groups (see `group_of`); None: every group in the file.

  Returns:
    The selected questions, in file order.

  Raises:
    ValueError: for a missing or malformed file, an unknown group, or N < 1.
  """
  if num_questions_per_group is not None and num_questions_per_group < 1:
    raise ValueError(f'the number of questions per group must be >= 1, got '
                     f'{num_questions_per_group}')
  questions = _read_questions(Path(path))
  present = list(dict.fromkeys(group_of(q['category']) for q in questions))
  wanted = list(groups) if groups else present
  unknown = [g for g in wanted if g not in present]
  if unknown:
    raise ValueError(f'unknown group(s) {", ".join(unknown)}; {path} has {", ".join(present)}')
  taken = collections.Counter()
  selected = []
  for question in questions:
    group = group_of(question['category'])
    if group in wanted and (num_questions_per_group is None
                            or taken[group] < num_questions_per_group):
      taken[group] += 1
      selected.append(question)
  return selected


def _read_questions(path: Path) -> list[dict]:
  """Every question of a question file, checked for the fields the benchmark uses."""
  if not path.is_file():
    raise ValueError(f'questions file {path} does not exist')
  questions = []
  for lineno, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      question = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{lineno}: not valid JSON ({e})') from None
    if not _is_question(question):
      raise ValueError(f'{path}:{lineno}: a question needs question_id, category and a '
                       f'non-empty list of turns')
    questions.append(question)
  ids = [q['question_id'] for q in questions]
  if len(set(ids)) != len(ids):
    raise ValueError(f'{path}: question ids are not unique')
  if not questions:
    raise ValueError(f'{path} holds no questions')
  return questions


def _is_question(question: Any) -> bool:
  if not isinstance(question, dict) or not {'question_id', 'category'} <= question.keys():
    return False
  turns = question.get('turns')
  return bool(turns) and isinstance(turns, list) and all(isinstance(t, str) for t in turns)


@dataclasses.dataclass
class _WarmGenerator:
  """Times generations, first compiling (untimed) what each one may run.

  Before each timed generation Python's garbage collector runs a full collection: one costs
  0.1-0.2 s on a 2-core CPU, and a collection that fell inside a timed generation would be
  charged to whichever method happened to be running.
  """

  generator: Generator
  max_new_tokens: int
  context: int
  seed: int
  warm: bool
  buckets: set[int] = dataclasses.field(default_factory=set)

  def warm_up(self, prompt_ids: list[int], times: int) -> None:
    for _ in range(times):
      self.generator.generate(prompt_ids, self.max_new_tokens, seed=self.seed)
    if times:
      self.buckets.add(prompt_bucket(len(prompt_ids), self.context))

  def generate(self, prompt_ids: list[int]) -> Generation:
    if self.warm:
      if hasattr(self.generator, 'compile'):
        self.generator.compile(len(prompt_ids), self.max_new_tokens)
      elif prompt_bucket(len(prompt_ids), self.context) not in self.buckets:
        self.warm_up(prompt_ids, 1)
    gc.collect()
    return self.generator.generate(prompt_ids, self.max_new_tokens, seed=self.seed)


def answer_path(out_dir: str | os.PathLike, method: str) -> Path:
  """A method's answer file: `<out_dir>/<method>.jsonl`, a variant's colons written as '+'
  (`clasp:skip_layers=4` -> `clasp+skip_layers=4.jsonl`) so that every file system takes it."""
  return Path(out_dir) / f"{method.replace(':', '+')}.jsonl"


@dataclasses.dataclass
class _MethodRun:
  """One method's answering: its timed generator, its answer file and what that holds."""

  model: LoadedModel
  timed: _WarmGenerator
  answer_file: Path
  method: str
  done: set

  def answer(self, question: dict) -> None:
    """Answers one question (unless already answered) and appends its line at once."""
    if question['question_id'] in self.done:
      return
    generations = _answer(self.model, self.timed, question)
    with self.answer_file.open('a') as f:
      f.write(_json_line(_record(question, generations, _model_id(self.model), self.method)))
    self.done.add(question['question_id'])


def _start_method(model: LoadedModel, decoder: Generator, questions: Sequence[dict], *,
                  max_new_tokens: int, answer_file: str | os.PathLike, resume: bool,
                  warmup: int, method: str | None, seed: int) -> _MethodRun:
  """Prepares the answer file and warms the decoder up on the first question left to answer."""
  answer_file = Path(answer_file)
  method = method or answer_file.stem
  done = _prepare_answer_file(answer_file, resume, method)
  timed = _WarmGenerator(decoder, max_new_tokens, model.config.max_position_embeddings, seed,
                         warm=warmup > 0)
  todo = [q for q in questions if q['question_id'] not in done]
  if todo:
    timed.warm_up(encode_prompt(model, todo[0]['turns'][0], chat=True), warmup)
  return _MethodRun(model, timed, answer_file, method, done)


def run_method(model: LoadedModel, decoder: Generator, questions: Sequence[dict], *,
               max_new_tokens: int, answer_file: str | os.PathLike, resume: bool,
               warmup: int = 3, progress: bool = True, method: str | None = None,
               seed: int = 0) -> None:
  """Answers every question with one method, appending one JSON line per question.

  Args:
    model: the loaded model (its tokenizer builds the chat prompts).
    decoder: generates the answers (a `Decoder`, or `hf_reference.HFReference`).
    questions: from `load_questions`.
    max_new_tokens: the token budget of each turn.
    answer_file: the JSON-lines answer file (Spec-Bench's answer format).
    resume: keep the answers already in `answer_file` and answer only the other questions;
      otherwise the file is overwritten.
    warmup: untimed generations on the first question before timing (0: no warm-up at all;
      otherwise new prompt buckets are warmed up too, see the module docstring).
    progress: show a progress bar.
    method: the method's name in the answers; default: the answer file's name, less its
      extension.
    seed: the PRNG seed of every generation (used only when sampling).

  Raises:
    ValueError: for an answer file that cannot be resumed.
  """
  run = _start_method(model, decoder, questions, max_new_tokens=max_new_tokens,
                      answer_file=answer_file, resume=resume, warmup=warmup, method=method,
                      seed=seed)
  for question in tqdm.tqdm(questions, desc=run.method, disable=not progress):
    run.answer(question)


def run_interleaved(model: LoadedModel, decoders: dict[str, Generator],
                    questions: Sequence[dict], *, max_new_tokens: int,
                    out_dir: str | os.PathLike, resume: bool, warmup: int = 3,
                    progress: bool = True, seed: int = 0) -> None:
  """Answers the questions with every method in turn, question by question.

  Methods that share a machine one after the other also share its drifts (other processes,
  clocks, heat) unevenly; taking turns per question, in an order that rotates from one
  question to the next, spreads them over all methods alike, so that small speed differences
  can be measured. Answer files, warm-ups and `resume` are as in `run_method`.

  Args:
    model: the loaded model.
    decoders: method name -> generator.
    questions: from `load_questions`.
    max_new_tokens: the token budget of each turn.
    out_dir: where the answer files go (see `answer_path`).
    resume: keep the answers already written.
    warmup: untimed generations per method before timing.
    progress: show a progress bar (over questions).
    seed: the PRNG seed of every generation.
  """
  runs = [_start_method(model, decoder, questions, max_new_tokens=max_new_tokens,
                        answer_file=answer_path(out_dir, method), resume=resume,
                        warmup=warmup, method=method, seed=seed)
          for method, decoder in decoders.items()]
  for i, question in enumerate(tqdm.tqdm(questions, desc='interleaved',
                                         disable=not progress)):
    for run in runs[i % len(runs):] + runs[:i % len(runs)]:
      run.answer(question)


def _answer(model: LoadedModel, timed: _WarmGenerator, question: dict) -> list[Generation]:
  """Generates each turn; a later turn's prompt is the chat so far."""
  history, generations = [], []
  for turn in question['turns']:
    generation = timed.generate(encode_prompt(model, turn, chat=True, history=history))
    generations.append(generation)
    history += [{'role': 'user', 'content': turn},
                {'role': 'assistant', 'content': generation.text}]
  return generations


def _record(question: dict, generations: Sequence[Generation], model_id: str,
            method: str) -> dict:
  """One answer line in Spec-Bench's format (plus per-turn token ids and skip sets)."""
  return {
      'question_id': question['question_id'],
      'category': question['category'],
      'model_id': model_id,
      'method': method,
      'choices': [{
          'index': 0,
          'turns': [g.text for g in generations],
          'decoding_steps': [len(g.accept_lengths) + 1 for g in generations],
          'new_tokens': [g.new_tokens for g in generations],
          'wall_time': [g.wall_time for g in generations],
          'accept_lengths': [n for g in generations for n in g.accept_lengths],
          'draft_lengths': [n for g in generations for n in g.draft_lengths],
          'draft_sources': [s for g in generations for s in g.draft_sources],
          'token_ids': [list(g.token_ids) for g in generations],
          'skip_sets': [_skipped_layers(g.skip_sets) for g in generations],
      }],
      'tstamp': time.time(),
  }


def _skipped_layers(skip_RL: np.ndarray) -> list[list[int]]:
  """The skipped layers' indices in each round; [] for a turn whose draft skipped none.

  Index lists rather than L booleans per round keep the answer files small; a method that
  never skips (vanilla, pld, hf) records no rounds at all.
  """
  if not skip_RL.any():
    return []
  return [np.flatnonzero(skip_L).tolist() for skip_L in skip_RL]


def _json_line(record: dict) -> str:
  """An answer record as one compact JSON line (the skip sets and token ids make it long)."""
  return json.dumps(record, separators=(',', ':')) + '\n'


def _model_id(model: LoadedModel) -> str:
  """The checkpoint's file or folder name, as Spec-Bench's model_id."""
  return Path(str(model.source)).name.removesuffix('.gguf')


def _prepare_answer_file(path: Path, resume: bool, method: str) -> set:
  """Creates or cleans the answer file; returns the question ids already answered."""
  path.parent.mkdir(parents=True, exist_ok=True)
  records = read_answers(path) if resume and path.exists() else []
  stray = {r.get('method') for r in records} - {method}
  if stray:
    raise ValueError(f'cannot resume {path}: it holds answers of method {stray.pop()}, '
                     f'not {method}')
  path.write_text(''.join(_json_line(r) for r in records))
  return {r['question_id'] for r in records}


def read_answers(path: str | os.PathLike) -> list[dict]:
  """The answer records of a JSON-lines answer file.

  A truncated last line (the run was killed while writing it) is dropped.

  Raises:
    ValueError: for a malformed line anywhere else.
  """
  lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i < len(lines) - 1:
        raise ValueError(f'{path}: answer {i + 1} is not valid JSON') from None
  return records


def turn_accept_lengths(record: dict) -> list[list[int]]:
  """An answer's flat `accept_lengths` split into turns (turn t has decoding_steps[t] - 1)."""
  return _split_turns(record, _choice(record)['accept_lengths'])


def turn_draft_lengths(record: dict) -> list[list[int]] | None:
  """An answer's flat `draft_lengths` split into turns; None for an answer file written before
  draft lengths were recorded."""
  flat = _choice(record).get('draft_lengths')
  return None if flat is None else _split_turns(record, flat)


def turn_draft_sources(record: dict) -> list[list[str]] | None:
  """An answer's flat `draft_sources` ('plain', 'lookup' or 'skip' per round) split into
  turns; None for an answer file written before draft sources were recorded."""
  flat = _choice(record).get('draft_sources')
  return None if flat is None else _split_turns(record, flat)


def _split_turns(record: dict, flat: Sequence[int]) -> list[list[int]]:
  """A flat per-round list split into turns (turn t has decoding_steps[t] - 1 rounds)."""
  turns, start = [], 0
  for steps in _choice(record)['decoding_steps']:
    turns.append(list(flat[start:start + steps - 1]))
    start += steps - 1
  return turns


def summarize(answer_dir: str | os.PathLike, methods: Sequence[str],
              header: str = '') -> dict[str, Any]:
  """Per-group and overall statistics of each method; writes summary.json and summary.md.

  Reads each method's `answer_path` and uses the questions every method answered.

  Args:
    answer_dir: the folder of the answer files, where the summary goes too.
    methods: the methods to summarize, vanilla among them.
    header: markdown put before the table in summary.md (the run's settings).

  Returns:
    {method: {group: {'tokens_per_second', 'speedup', 'tau', 'identical_to_vanilla', 'total',
    'drafting_rounds', 'rounds_by_source'}}}, groups in Spec-Bench's order, then 'overall'.
    tokens_per_second is the mean over questions of sum(new_tokens) / sum(wall_time); speedup
    divides it by vanilla's; tau is the mean tokens committed per round over all rounds;
    identical_to_vanilla counts the questions whose every turn has vanilla's token ids, out of
    `total`; drafting_rounds counts the rounds that drafted (None when an answer file predates
    draft lengths); rounds_by_source counts the rounds by where their drafts came from
    ({'plain', 'lookup', 'skip'}: None when an answer file predates draft sources).

  Raises:
    ValueError: without vanilla among the methods, or with no question answered by all.
  """
  if BASELINE not in methods:
    raise ValueError(f'the summary compares with {BASELINE}: include it in the methods')
  answer_dir = Path(answer_dir)
  answers = {m: {r['question_id']: r for r in read_answers(answer_path(answer_dir, m))}
             for m in methods}
  common = [q for q in answers[BASELINE] if all(q in a for a in answers.values())]
  if not common:
    raise ValueError(f'no question in {answer_dir} was answered by every method')
  baseline = answers[BASELINE]
  groups = _group_questions(baseline, common)
  summary = {m: {g: _stats([answers[m][q] for q in ids], [baseline[q] for q in ids])
                 for g, ids in groups.items()}
             for m in methods}
  (answer_dir / 'summary.json').write_text(json.dumps(summary, indent=2) + '\n')
  (answer_dir / 'summary.md').write_text(header + format_table(summary))
  return summary


def _group_questions(records: dict, question_ids: Sequence) -> dict[str, list]:
  """Question ids by group (Spec-Bench's order, then any others), then all under 'overall'."""
  by_group = collections.defaultdict(list)
  for q in question_ids:
    by_group[group_of(records[q]['category'])].append(q)
  order = [g for g in GROUPS if g in by_group] + [g for g in by_group if g not in GROUPS]
  return {g: by_group[g] for g in order} | {OVERALL: list(question_ids)}


def _stats(records: Sequence[dict], baseline: Sequence[dict]) -> dict[str, Any]:
  tokens_per_second = statistics.fmean(_speed(r) for r in records)
  return {
      'tokens_per_second': tokens_per_second,
      'speedup': tokens_per_second / statistics.fmean(_speed(r) for r in baseline),
      'tau': _tau(records),
      'identical_to_vanilla': sum(_choice(r)['token_ids'] == _choice(b)['token_ids']
                                  for r, b in zip(records, baseline)),
      'total': len(records),
      'drafting_rounds': _drafting_rounds(records),
      'rounds_by_source': _rounds_by_source(records),
  }


def _rounds_by_source(records: Sequence[dict]) -> dict[str, int] | None:
  """Rounds by draft source over every turn; None if any answer lacks draft sources."""
  if any('draft_sources' not in _choice(r) for r in records):
    return None
  counts = collections.Counter(s for r in records for s in _choice(r)['draft_sources'])
  return {source: counts[source] for source in DRAFT_SOURCES}


def _drafting_rounds(records: Sequence[dict]) -> int | None:
  """The rounds that drafted, over every turn; None if any answer lacks draft lengths."""
  if any('draft_lengths' not in _choice(r) for r in records):
    return None
  return sum(n > 0 for r in records for n in _choice(r)['draft_lengths'])


def _source_shares(stats: dict[str, Any]) -> str:
  """'lookup% / skip%' of a group's rounds, or '' when the answers predate draft sources."""
  counts = stats.get('rounds_by_source')
  if not counts or not sum(counts.values()):
    return ''
  total = sum(counts.values())
  return f'{counts["lookup"] / total:.0%} / {counts["skip"] / total:.0%}'


def decoded_plainly(method: str, stats: dict[str, Any]) -> bool:
  """Whether a method that can draft drafted in no round of these stats (one group's, from
  `summarize`): its speedup then reflects no drafting at all (see PLAIN_NOTE)."""
  return method not in _PLAIN_METHODS and stats.get('drafting_rounds') == 0


def _choice(record: dict) -> dict:
  return record['choices'][0]


def _speed(record: dict) -> float:
  """A question's tokens/s: its new tokens over its wall time, all turns together."""
  return sum(_choice(record)['new_tokens']) / sum(_choice(record)['wall_time'])


def _tau(records: Sequence[dict]) -> float:
  """Mean tokens committed per round, over every round of every turn."""
  rounds = [n for r in records for n in _choice(r)['accept_lengths']]
  return statistics.fmean(rounds) if rounds else 0.0


def format_table(summary: dict[str, Any]) -> str:
  """The summary as a markdown table, one row per method and group.

  A row where a drafting method never drafted has its speedup marked `(plain)`, explained by
  PLAIN_NOTE below the table: otherwise a speedup such as 1.04x reads like a gain.
  """
  rows = ['| method | group | questions | tokens/s | speedup | tau | identical to vanilla | '
          'rounds drafted from lookup / skip |',
          '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |']
  plain = False
  for method, groups in summary.items():
    for group, s in groups.items():
      mark = ' (plain)' if decoded_plainly(method, s) else ''
      plain |= bool(mark)
      rows.append(f'| {method} | {group} | {s["total"]} | {s["tokens_per_second"]:.1f} | '
                  f'{s["speedup"]:.2f}x{mark} | {s["tau"]:.2f} | '
                  f'{s["identical_to_vanilla"]}/{s["total"]} | {_source_shares(s)} |')
  if plain:
    rows += ['', PLAIN_NOTE]
  return '\n'.join(rows) + '\n'
