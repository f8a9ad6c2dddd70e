"""clasp-bench: Spec-Bench speed and losslessness of several decoding methods on one model.

  clasp-bench --methods=vanilla,clasp,static,pld,hf --num_questions=10 --out_dir=runs/specbench
  clasp-bench --methods=clasp,clasp:skip_layers=4,clasp:skip_layers=8:loi=1 ...

A method may carry its own settings after colons (`name:setting=value:...`, settings from
`VARIANT_SETTINGS`), overriding the flags for that method alone: a sweep in one run.

Answers the questions with each method in turn (vanilla first: the speedups are relative to it),
one answer file per method in --out_dir, then writes the summary (summary.json; summary.md, the
table under the run's settings and command line; speedup.png, tau.png and skip_heatmap.png) and
prints the table. Every setting is checked, and every decoder built, before the first compile.
Progress messages and bars go to stderr unless --quiet is given.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import datetime
import os
from pathlib import Path
import re
import shlex
import sys
from typing import Any

from absl import flags
import jax

from clasp_jax import strategies
from clasp_jax import weights
from clasp_jax.bench import hf_reference
from clasp_jax.bench import plots
from clasp_jax.bench import specbench
from clasp_jax.cli import flags as flags_lib
from clasp_jax.generation import make_decoder
from clasp_jax.sampling import SamplingConfig

HF = specbench.HF
BENCH_METHODS = (*strategies.METHODS, HF)
_SPEC_BENCH = Path(__file__).resolve().parents[2].parent / 'shared/data/spec_bench/question.jsonl'

flags.DEFINE_list('methods', 'vanilla,clasp,static,pld', 'Methods to compare, from '
                  f'{",".join(BENCH_METHODS)} (vanilla is always run); `name:setting=value` '
                  'overrides a strategy flag for that method (e.g. clasp:skip_layers=4).')
flags.DEFINE_string('questions', str(_SPEC_BENCH) if _SPEC_BENCH.exists() else None,
                    'Spec-Bench question file (JSON lines).')
flags.DEFINE_integer('num_questions', None, 'Questions per group (the first N in file order); '
                     'unset: all.', lower_bound=1)
flags.DEFINE_list('groups', None, f'Groups to run, from {",".join(specbench.GROUPS)}; unset: '
                  'all.')
flags.DEFINE_string('out_dir', 'runs/specbench', 'Folder of the answer files and the summary.')
flags.DEFINE_bool('resume', False, 'Keep the answers already in --out_dir; answer the rest.')
flags.DEFINE_integer('warmup', 3, 'Untimed warm-up generations per method (0: none).',
                     lower_bound=0)
flags.DEFINE_bool('interleave', False, 'Take turns per question (rotating the order) instead of '
                  'running each method over all questions in turn: machine drift then hits '
                  'every method alike, for measuring small differences.')
flags.adopt_module_key_flags(flags_lib)

FLAGS = flags.FLAGS

_DEFAULT_MAX_NEW_TOKENS = 1024
# Words the shell reads as they are (shlex.quote's safe characters, and `~`).
_SHELL_SAFE = re.compile(r'[\w@%+=:,./~-]+')


#: Strategy settings a method variant may override, with their parsers.
VARIANT_SETTINGS = {'skip_layers': flags_lib.parse_skip_layers, 'skip_ratio': float,
                    'num_draft_tokens': int, 'draft_exit_threshold': float, 'loi': int,
                    'lookup': flags_lib.parse_bool}


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
  """`name:setting=value:...` -> (name, {setting: value}).

  Raises:
    ValueError: for an unknown method or setting, or a value that does not parse.
  """
  name, *items = spec.split(':')
  if name not in BENCH_METHODS:
    raise ValueError(f'unknown method {name!r}; choose from {", ".join(BENCH_METHODS)}')
  overrides = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep or key not in VARIANT_SETTINGS:
      raise ValueError(f'method {spec!r}: expected setting=value with a setting from '
                       f'{", ".join(VARIANT_SETTINGS)}, got {item!r}')
    try:
      overrides[key] = VARIANT_SETTINGS[key](value)
    except ValueError as e:
      raise ValueError(f'method {spec!r}: bad value for {key}: {e}') from None
  if overrides and name in (HF, specbench.BASELINE):
    raise ValueError(f'method {spec!r}: {name} takes no settings')
  return name, overrides


def methods_to_run(methods: Sequence[str]) -> list[str]:
  """The method specs in order, vanilla first and added if missing, without repeats.

  Raises:
    ValueError: for an unknown method or setting (see `parse_method`).
  """
  for spec in methods:
    parse_method(spec)
  return list(dict.fromkeys([specbench.BASELINE, *methods]))


def make_generator(model: weights.LoadedModel, spec: str, sampling: SamplingConfig,
                   strategy_kwargs: dict[str, Any]) -> specbench.Generator:
  """The decoder of one method spec (validated; nothing is compiled yet)."""
  method, overrides = parse_method(spec)
  if method == HF:
    if not sampling.greedy:
      raise ValueError('method hf decodes greedily: drop it or use --temperature=0')
    return hf_reference.load_reference(model)
  if {'skip_layers', 'skip_ratio'} & set(overrides):  # a variant's M replaces the flags'
    strategy_kwargs = dict(strategy_kwargs, skip_layers=None, skip_ratio=None)
  return make_decoder(model, method, **dataclasses.asdict(sampling), **flags_lib.decoder_kwargs(),
                      **{**strategy_kwargs, **overrides})


def portable_path(path: str) -> str:
  """A path as a reader of the summary on another machine can use it.

  Absolute paths under the current directory become relative to it, and those under the home
  directory start with `~`; any other path is left as it is.
  """
  if not os.path.isabs(path):
    return path
  path = os.path.normpath(path)
  for base, prefix in ((os.getcwd(), ''), (os.path.expanduser('~'), '~')):
    if path == base or path.startswith(base.rstrip(os.sep) + os.sep):
      relative = os.path.relpath(path, base)
      return os.path.join(prefix, relative) if prefix else relative
  return path


def portable_command(argv: Sequence[str]) -> str:
  """The command line as one can type it again: the console script by its name, a Python file
  after `python`, a module after `python -m` (`argv` then `['python', '-m', module, ...]`),
  each path portable (see `portable_path`), quoted for the shell where needed.

  A `~` is left unquoted: the shell expands it at the start of a word, and the CLIs expand it
  in every path flag.
  """
  program, args = argv[0], argv[1:]
  if args[:1] == ['-m']:
    words, args = ['python', '-m', args[1]], args[2:]
  elif program.endswith('.py'):
    words = ['python', portable_path(program)]
  else:
    words = [os.path.basename(program)]
  for arg in args:
    name, sep, value = arg.partition('=')
    if arg.startswith('-') and sep:
      words.append(f'{name}={portable_path(value)}')
    else:
      words.append(portable_path(arg))
  return ' '.join(w if _SHELL_SAFE.fullmatch(w) else shlex.quote(w) for w in words)


def _typed_argv() -> list[str]:
  """`sys.argv` as `portable_command` wants it: run as `python -m <module>`, `sys.argv[0]` is
  the module's file, so the module's name comes from `sys.orig_argv` (the interpreter's own
  options left out)."""
  before_args = sys.orig_argv[:len(sys.orig_argv) - len(sys.argv) + 1]  # ..., '-m', module
  if before_args[-2:-1] == ['-m']:
    return ['python', '-m', before_args[-1], *sys.argv[1:]]
  return sys.argv


def _method_settings(generator: specbench.Generator) -> str:
  """How a method decodes: its strategy's settings (paths in them portable) and its passes'
  width, or the transformers reference."""
  if isinstance(generator, hf_reference.HFReference):
    return 'transformers `generate`, greedy, float32 (PyTorch)'
  settings = re.sub(r"'(/[^']*)'", lambda m: repr(portable_path(m[1])), str(generator.strategy))
  rows, plain = generator.pass_width, generator.plain_width
  steps = f', plain steps of {plain}' if plain != rows else ''
  return f'`{settings}`, passes of {rows} row{"s" if rows > 1 else ""}{steps}'


def run_header(model: weights.LoadedModel, generators: dict[str, specbench.Generator],
               questions: Sequence[dict], sampling: SamplingConfig) -> str:
  """The run's settings as markdown, put above the table so a summary says how it was made.

  Paths are written so that the command can be run again elsewhere (see `portable_command`),
  and the model is named as the user named it.
  """
  dtype = jax.tree.leaves(model.params)[0].dtype
  groups = ', '.join(FLAGS.groups) if FLAGS.groups else 'all'
  per_group = f'first {FLAGS.num_questions} per group' if FLAGS.num_questions else 'all'
  model_name = (f'`{portable_path(FLAGS.model)}`' if FLAGS.model
                else flags_lib.EMBEDDED_MODEL_NAME)
  lines = [
      '# Spec-Bench summary',
      '',
      f'- command: `{portable_command(_typed_argv())}`',
      f'- date: {datetime.datetime.now().astimezone().isoformat(timespec="seconds")}',
      f'- model: {model_name} ({model.config.num_layers} layers, {dtype})',
      f'- device: {jax.devices()[0].device_kind}, jax {jax.__version__}',
      f'- questions: {len(questions)} ({per_group}; groups: {groups}), max_new_tokens '
      f'{FLAGS.max_new_tokens} per turn, warm-up {FLAGS.warmup}',
      f'- sampling: `{sampling}`, seed {FLAGS.seed}',
      '- methods:',
      *(f'  - {method}: {_method_settings(g)}' for method, g in generators.items()),
  ]
  return '\n'.join(lines) + '\n\n'


def bench_from_flags() -> str:
  """Runs the benchmark as the flags say; returns the summary table (markdown).

  Raises:
    ValueError: for bad settings, found before anything compiles.
  """
  methods = methods_to_run(FLAGS.methods)
  if FLAGS.questions is None:
    raise ValueError(f'--questions is required (no Spec-Bench file at {_SPEC_BENCH})')
  questions = specbench.load_questions(os.path.expanduser(FLAGS.questions), FLAGS.num_questions,
                                       FLAGS.groups)
  sampling = flags_lib.sampling_config()
  strategy_kwargs = flags_lib.strategy_kwargs()
  model = flags_lib.load_model()
  generators = {m: make_generator(model, m, sampling, strategy_kwargs) for m in methods}
  out_dir = Path(FLAGS.out_dir).expanduser()
  flags_lib.progress(f'answering {len(questions)} questions with {", ".join(methods)} (each '
                     f'method compiles and warms up first) ...')
  answering = dict(max_new_tokens=FLAGS.max_new_tokens, resume=FLAGS.resume,
                   warmup=FLAGS.warmup, progress=not FLAGS.quiet, seed=FLAGS.seed)
  if FLAGS.interleave:
    specbench.run_interleaved(model, generators, questions, out_dir=out_dir, **answering)
  else:
    for method, generator in generators.items():
      specbench.run_method(model, generator, questions,
                           answer_file=specbench.answer_path(out_dir, method), method=method,
                           **answering)
  header = run_header(model, generators, questions, sampling)
  summary = specbench.summarize(out_dir, methods, header=header)
  plots.write_plots(out_dir, summary, methods, model.config.num_layers)
  return specbench.format_table(summary)


def main(argv: Sequence[str]) -> None:
  with flags_lib.usage_errors(argv):
    table = bench_from_flags()
  print(table, end='')


def run() -> None:
  """The `clasp-bench` console script."""
  FLAGS.set_default('max_new_tokens', _DEFAULT_MAX_NEW_TOKENS)
  flags_lib.run(main, __name__)


if __name__ == '__main__':
  run()
