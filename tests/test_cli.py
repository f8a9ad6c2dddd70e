"""The CLIs: bad input gets `error: <reason>` and exit code 2 before any compile, --help lists
their flags, a run says what it is doing on stderr and nothing else, and the stats line and the
benchmark summary's header."""

import concurrent.futures
import io
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from clasp_jax import weights
from clasp_jax import widths
from clasp_jax.cli import bench
from clasp_jax.cli import flags as flags_lib
from clasp_jax.cli import generate
from clasp_jax.engine import Generation
from clasp_jax.sampling import SamplingConfig

# JAX logs every compilation, so the tests can tell that none happened.
_ENV = dict(os.environ, JAX_LOG_COMPILES='1', JAX_PLATFORMS='cpu')

# What pip's console-script shim does, with torch hidden from transformers as on a machine
# without it (the README's run command installs no torch): a `__main__` without a docstring
# and an argv[0] that names no module of ours.
_SHIM = ('import sys; sys.modules["torch"] = None; sys.argv[0] = "{name}"; '
         'from clasp_jax.cli.{module} import run; sys.exit(run())')


def _run_cli(module: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True,
                        env=_ENV, timeout=120, check=False, input=stdin)


def _run_stdin_bytes(stdin: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'clasp_jax.cli.generate', '--prompt_file=-'],
                        capture_output=True, env=_ENV, timeout=120, check=False,
                        input=stdin.encode('utf-8', 'surrogateescape'))


def _run_console_script(name: str, *args: str) -> subprocess.CompletedProcess:
  """Runs `clasp-generate` or `clasp-bench` as its console script would."""
  module = name.removeprefix('clasp-')
  command = _SHIM.format(name=name, module=module)
  return subprocess.run([sys.executable, '-c', command, *args], capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300, check=False)


def _assert_usage_error(result: subprocess.CompletedProcess, reason: str) -> None:
  assert result.returncode == 2, result.stderr
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith('error: ') and reason in last_line, result.stderr
  assert result.stdout == ''


_GENERATE_REJECTIONS = [
    (['--prompt='], 'the prompt is empty'),
    (['--max_new_tokens=100'], 'give exactly one of --prompt and --prompt_file'),
    (['--prompt=hi', '--prompt_file=p.txt'], 'give exactly one of --prompt and --prompt_file'),
    (['--prompt_file=/nope.txt'], '--prompt_file=/nope.txt: No such file or directory'),
    (['--prompt_file=/'], '--prompt_file=/: Is a directory'),
    (['--prompt=hi', '--cache_dir=/proc/clasp/cache'], '--cache_dir=/proc/clasp/cache: cannot '
     'create it (No such file or directory)'),
    (['--prompt=hi', '--cache_dir=/proc/version'], '--cache_dir=/proc/version: exists and is not '
     'a folder'),
    (['--prompt=hi', '--max_new_tokens=-1'], '--max_new_tokens=-1'),
    (['--prompt=hi', '--pass_width=0'], '--pass_width=0'),
    (['--prompt=hi', '--temperature=-1'], 'temperature must be >= 0'),
    (['--prompt=hi', '--temperature=1', '--top_p=1.5'], 'top_p must be in (0, 1]'),
    (['--prompt=hi', '--method=static', '--skip_set=2,x'], '--skip_set must list layer indices'),
    (['--prompt=hi', '--model=/nope'], '/nope: no such file or directory'),
]
_STDIN_REJECTIONS = [
    ('\n  \n', 'the prompt is empty (--prompt_file=-)'),
    ('caf\udce9', '--prompt_file=-: not UTF-8 text'),
]
_TOO_MANY_SKIPPED = ('--prompt=hi', '--skip_layers=1000', '--cache_dir=')
_BENCH_REJECTIONS = [
    (['--methods=vanilla,beam'], "unknown method 'beam'"),
    (['--methods=clasp:depth=3'], "method 'clasp:depth=3': expected setting=value"),
    (['--methods=clasp:skip_layers=x'], "skip_layers must be an integer or 'auto'"),
    (['--methods=vanilla:loi=2'], 'vanilla takes no settings'),
    (['--questions=/nope.jsonl'], 'questions file /nope.jsonl does not exist'),
    (['--num_questions=0'], '--num_questions=0'),
]


@pytest.fixture(scope='module')
def rejections():
  """`get(key) -> CompletedProcess` of every rejected CLI run below, all started at once, two
  at a time: each is a fresh interpreter importing the package on one core for ~4 s, so two
  run side by side on 2 cores (each test still checks its own run)."""
  runs = {('generate', *args): (_run_cli, 'clasp_jax.cli.generate', *args)
          for args, _ in _GENERATE_REJECTIONS}
  runs[('generate', *_TOO_MANY_SKIPPED)] = (_run_cli, 'clasp_jax.cli.generate',
                                            *_TOO_MANY_SKIPPED)
  runs.update({('stdin', stdin): (_run_stdin_bytes, stdin) for stdin, _ in _STDIN_REJECTIONS})
  runs.update({('bench', *args): (_run_cli, 'clasp_jax.cli.bench', *args)
               for args, _ in _BENCH_REJECTIONS})
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = {key: pool.submit(*call) for key, call in runs.items()}
    yield lambda key: futures[key].result()
    for future in futures.values():
      future.cancel()


@pytest.mark.parametrize('args, reason', _GENERATE_REJECTIONS)
def test_generate_rejects_before_loading(rejections, args, reason):
  result = rejections(('generate', *args))
  _assert_usage_error(result, reason)
  assert 'Compiling' not in result.stderr


@pytest.mark.parametrize('stdin, reason', _STDIN_REJECTIONS)
def test_generate_rejects_a_bad_prompt_from_stdin(rejections, stdin, reason):
  result = rejections(('stdin', stdin))
  assert result.returncode == 2, result.stderr
  assert result.stderr.decode().strip().splitlines()[-1] == f'error: {reason}'


def test_generate_rejects_too_many_skipped_layers_before_compiling(rejections):
  result = rejections(('generate', *_TOO_MANY_SKIPPED))
  _assert_usage_error(result, 'skip_layers (M) must be in [0, L)')
  assert 'Compiling jit(_prefill)' not in result.stderr


@pytest.mark.parametrize('args, reason', _BENCH_REJECTIONS)
def test_bench_rejects_before_loading(rejections, args, reason):
  result = rejections(('bench', *args))
  _assert_usage_error(result, reason)
  assert 'Compiling' not in result.stderr


@pytest.mark.parametrize('name, own_flags', [
    ('clasp-generate', ['--prompt_file', '--chat', '--method']),
    ('clasp-bench', ['--methods', '--interleave', '--out_dir']),
])
def test_help_lists_the_cli_flags_and_not_the_libraries(name, own_flags):
  result = _run_console_script(name, '--help')
  assert result.stdout.startswith(f'{name}: '), result.stdout  # The CLI's docstring.
  shared = ['--model', '--num_draft_tokens', '--quiet', '--cache_dir']
  for flag in own_flags + shared:
    assert f'  {flag}:' in result.stdout or f'  --[no]{flag[2:]}:' in result.stdout, flag
  assert 'orbax' not in result.stdout and '--verbosity' not in result.stdout
  assert 'Try --helpfull' in result.stdout


_COMPILING = ('compiling, then generating (the first run compiles; later ones load the compiled '
              'programs from --cache_dir) ...')


def _compile_seconds(stdout: str) -> float:
  """The compile time on a stats line (`... | compiling 1.2 s | ...`)."""
  part = next(p for p in stdout.splitlines()[-1].split(' | ') if p.startswith('compiling '))
  return float(part.split()[1])


def test_a_run_says_what_it_does_on_stderr_and_nothing_else(tiny_hf_checkpoint, tmp_path):
  """Progress lines only (no transformers advice about PyTorch, no logs); none with --quiet."""
  args = [f'--model={tiny_hf_checkpoint}', '--prompt=the sky', '--max_new_tokens=4',
          '--method=vanilla', f'--cache_dir={tmp_path}']
  first = _run_console_script('clasp-generate', *args)
  assert first.returncode == 0, first.stderr
  assert first.stderr.splitlines() == [
      f'loading {tiny_hf_checkpoint} ...',
      f'converting the Hugging Face checkpoint (first run only; cached under {tmp_path}) ...',
      _COMPILING,
  ]
  assert first.stdout.splitlines()[-1].startswith('prompt tokens ')
  cached = _run_console_script('clasp-generate', *args)
  assert cached.stderr.splitlines() == [f'loading {tiny_hf_checkpoint} ...', _COMPILING]
  # The second process loads the first one's compiled programs from --cache_dir.
  assert os.listdir(tmp_path / 'xla')
  assert _compile_seconds(cached.stdout) < _compile_seconds(first.stdout) / 2
  quiet = _run_console_script('clasp-generate', *args, '--quiet')
  assert quiet.returncode == 0 and quiet.stderr == '', quiet.stderr
  assert quiet.stdout.splitlines()[:-1] == cached.stdout.splitlines()[:-1]  # The same text.


@pytest.fixture
def parse_flags():
  """Parses the CLIs' flags in this process, each time from their defaults, which it restores
  after the test."""
  def parse(*args):
    generate.FLAGS.unparse_flags()
    return generate.FLAGS(['clasp-generate', *args])

  yield parse
  generate.FLAGS.unparse_flags()


def test_prompt_file_and_stdin_give_the_prompt(parse_flags, tmp_path, monkeypatch):
  path = tmp_path / 'prompt.txt'
  path.write_text('Summarise:\n\nthe text\n\n')
  parse_flags(f'--prompt_file={path}')
  assert generate.read_prompt() == 'Summarise:\n\nthe text'
  parse_flags('--prompt_file=-')
  monkeypatch.setattr(sys, 'stdin', io.TextIOWrapper(io.BytesIO('Résumé\n'.encode())))
  assert generate.read_prompt() == 'Résumé'


@pytest.mark.parametrize('args, environ, expected', [
    ((), {}, 'false'),
    ((), {'XLA_PYTHON_CLIENT_PREALLOCATE': 'true'}, 'true'),
    (('--preallocate',), {'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}, 'true'),
    (('--nopreallocate',), {'XLA_PYTHON_CLIENT_PREALLOCATE': 'true'}, 'false'),
])
def test_memory_is_taken_as_needed_unless_asked_to_preallocate(parse_flags, args, environ,
                                                               expected):
  parse_flags('--prompt=p', *args)
  flags_lib.set_preallocation(environ)
  assert environ == {'XLA_PYTHON_CLIENT_PREALLOCATE': expected}


def test_no_device_starts_before_the_preallocation_is_set():
  """Nothing before `set_preallocation` starts a backend, which would read the setting too early."""
  script = ('import sys\n'
            'from jax._src import xla_bridge\n'
            'from clasp_jax.cli import flags, generate\n'
            'def stop(environ=None):\n'
            '  print(xla_bridge.backends_are_initialized()); sys.exit(0)\n'
            'flags.set_preallocation = stop\n'
            'generate.FLAGS(["clasp-generate", "--prompt=p", "--method=clasp"])\n'
            'generate.generate_from_flags()\n')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          env=_ENV, timeout=120, check=True)
  assert result.stdout.strip() == 'False', result.stderr


def _generation(wall_time: float, compile_seconds: float, accept_lengths: list[int],
                calibration_seconds: float = 0.0,
                first_token_seconds: float | None = None) -> Generation:
  rounds = len(accept_lengths)
  return Generation(token_ids=list(range(1 + sum(accept_lengths))), text='t', prompt_tokens=5,
                    wall_time=wall_time, compile_seconds=compile_seconds,
                    accept_lengths=accept_lengths,
                    draft_lengths=[4] * rounds, draft_sources=["skip"] * rounds,
                    skip_sets=np.zeros((rounds, 2), bool),
                    refresh_times=[], calibration_seconds=calibration_seconds,
                    first_token_seconds=first_token_seconds)


STATS_LINES = [
    (dict(compile_seconds=10.0), True,
     'prompt tokens 5 | new tokens 20 | decoding 2.0 s, 10.0 tokens/s | compiling 10.0 s | '
     'tau 3.17 | rounds 6'),
    (dict(compile_seconds=0.0), False,
     'prompt tokens 5 | new tokens 20 | decoding 12.0 s, 1.7 tokens/s | compiling 0.0 s'),
    # The default method's first run, timing the device's step costs: out of the speed too.
    (dict(compile_seconds=6.0, calibration_seconds=4.0), True,
     'prompt tokens 5 | new tokens 20 | decoding 2.0 s, 10.0 tokens/s | compiling 6.0 s | '
     'timing the device 4.0 s | tau 3.17 | rounds 6'),
    # Streamed: the time to the first token, and the speed of the 19 tokens after it.
    (dict(compile_seconds=10.0, first_token_seconds=0.1), False,
     'prompt tokens 5 | new tokens 20 | first token 0.10 s | '
     'decoding 2.0 s, 10.0 tokens/s (10.0 after the first) | compiling 10.0 s'),
    (dict(compile_seconds=10.0, first_token_seconds=1.05), False,
     'prompt tokens 5 | new tokens 20 | first token 1.05 s | '
     'decoding 2.0 s, 10.0 tokens/s (20.0 after the first) | compiling 10.0 s'),
]


@pytest.mark.parametrize('times, speculative, line', STATS_LINES)
def test_stats_line_leaves_compilation_and_calibration_out_of_the_speed(times, speculative,
                                                                         line):
  accepted = [3, 4, 1, 3, 3, 5]  # 20 tokens in 12 s of wall time
  generation = _generation(wall_time=12.0, accept_lengths=accepted, **times)
  assert generate.stats_line(generation, speculative=speculative) == line


def test_pass_width_reaches_every_decoder(tiny_hf_checkpoint, parse_flags, monkeypatch):
  """--pass_width sets the rows of every method's passes, and K unset follows it (what one
  pass verifies); unset, the platform's. The model is loaded in the layer layout those
  decoders run on (1-row passes: per layer everywhere; 9-row ones stacked on a CPU)."""
  # `load_kwargs` fills in the preallocation setting: this test's process keeps its own.
  monkeypatch.setenv('XLA_PYTHON_CLIENT_PREALLOCATE', os.environ.get(
      'XLA_PYTHON_CLIENT_PREALLOCATE', 'false'))
  model = weights.load(tiny_hf_checkpoint)
  default_k = 2 if jax.default_backend() == 'cpu' else 8  # what one default pass verifies
  for width, k in ((None, default_k), (1, 1), (9, 8)):
    parse_flags('--prompt=p', *([f'--pass_width={width}'] if width else []))
    decoders = [bench.make_generator(model, m, SamplingConfig(), {}) for m in ('vanilla', 'pld')]
    assert [d.pass_width for d in decoders] == [width or widths.default_pass_width()] * 2
    assert decoders[1].strategy.num_draft_tokens == k
    assert {d.fast_path for d in decoders} == {flags_lib.load_kwargs()['per_layer']}
  assert decoders[0].fast_path == (jax.default_backend() != 'cpu')
  parse_flags('--prompt=p', '--pass_width=1')
  vanilla = bench.make_generator(model, 'vanilla', SamplingConfig(), {})
  assert vanilla.fast_path
  assert bench._method_settings(vanilla) == '`Vanilla()`, passes of 1 row'  # the summary


def test_pass_settings_reach_every_decoder(tiny_hf_checkpoint, parse_flags, monkeypatch):
  """--cpu_kernel and --rows_apart reach every method's decoder: on a CPU in float32 a pass's
  rows are apart unless asked not to be or the kernel is off. Rows apart where they cannot be,
  or the GPU kernel without a GPU, is an error before anything compiles."""
  monkeypatch.setenv('XLA_PYTHON_CLIENT_PREALLOCATE', os.environ.get(
      'XLA_PYTHON_CLIENT_PREALLOCATE', 'false'))
  model = weights.load(tiny_hf_checkpoint)
  on_cpu = jax.default_backend() == 'cpu'
  for args, apart in (((), on_cpu), (('--rows_apart=off',), False),
                      (('--cpu_kernel=off',), False), (('--attention=xla',), on_cpu)):
    parse_flags('--prompt=p', *args)
    decoders = [bench.make_generator(model, m, SamplingConfig(), {}) for m in ('vanilla', 'pld')]
    assert [d.rows_apart for d in decoders] == [apart] * 2, args
  parse_flags('--prompt=p', '--rows_apart=on', '--cpu_kernel=off')
  with pytest.raises(ValueError, match='rows_apart=True, but'):
    bench.make_generator(model, 'vanilla', SamplingConfig(), {})
  if jax.default_backend() != 'gpu':
    parse_flags('--prompt=p', '--attention=pallas')
    with pytest.raises(ValueError, match="attention='pallas' is the fused GPU kernel"):
      bench.make_generator(model, 'vanilla', SamplingConfig(), {})


def test_method_variants_override_flags_for_one_method():
  assert bench.parse_method('clasp:skip_layers=4:loi=1') == ('clasp', dict(skip_layers=4, loi=1))
  assert bench.parse_method('clasp:skip_layers=auto') == ('clasp', dict(skip_layers='auto'))
  assert bench.methods_to_run(['clasp:skip_layers=2', 'pld', 'pld']) == [
      'vanilla', 'clasp:skip_layers=2', 'pld']


def test_summary_command_is_portable(tmp_path, monkeypatch):
  """Paths under the current directory become relative, under home `~/...`; others stay."""
  home, cwd = tmp_path / 'home', tmp_path / 'home' / 'clasp_jax'
  cwd.mkdir(parents=True)
  monkeypatch.setenv('HOME', str(home))
  monkeypatch.chdir(cwd)
  argv = [str(home / 'venv/bin/clasp-bench'), f'--out_dir={cwd}/runs/a', f'--model={home}/m.gguf',
          '--methods=vanilla,clasp:skip_layers=4', '--questions', '/data/q.jsonl',
          '--cache_dir=/tmp/my cache']
  assert bench.portable_command(argv) == (
      "clasp-bench --out_dir=runs/a --model=~/m.gguf --methods=vanilla,clasp:skip_layers=4 "
      "--questions /data/q.jsonl '--cache_dir=/tmp/my cache'")
  assert bench.portable_command([str(cwd / 'scripts/bench.py'), '--resume']) == (
      'python scripts/bench.py --resume')
  assert bench.portable_command(['python', '-m', 'clasp_jax.cli.bench',
                                 f'--out_dir={cwd}/runs/b']) == (
      'python -m clasp_jax.cli.bench --out_dir=runs/b')
  assert bench.portable_path(str(cwd)) == '.'
  assert bench.portable_path(str(home / '.cache/clasp_jax')) == '~/.cache/clasp_jax'


class _ByteTokenizer:
  """Token i is byte i of UTF-8 text; 'tidy' drops a space before a comma, as some
  tokenizers' clean-up of spaces does."""

  def __init__(self, tidy: bool = False):
    self.tidy = tidy

  def decode(self, token_ids, skip_special_tokens=True):
    del skip_special_tokens
    text = bytes(token_ids).decode('utf-8', errors='replace')
    return text.replace(' ,', ',') if self.tidy else text


@pytest.mark.parametrize('text', ['Résumé, then 日本 done.', 'a ,b', 'ends in space '])
@pytest.mark.parametrize('tidy', [False, True])
@pytest.mark.parametrize('chunk', [1, 3])
def test_text_stream_prints_the_whole_text_once(text, tidy, chunk):
  """Token runs of any size, split inside a character or before a tidied space, print the
  generation's text once, and a line end."""
  out = io.StringIO()
  stream = generate.TextStream(_ByteTokenizer(tidy), out)
  ids = list(text.encode())
  shown = []
  for i in range(0, len(ids), chunk):
    stream(ids[i:i + chunk])
    shown.append(out.getvalue())
  final = _ByteTokenizer(tidy).decode(ids)
  stream.finish(final)
  assert out.getvalue() == final + '\n'
  assert '\ufffd' not in ''.join(shown)
  assert len(shown[-1]) >= len(final.rstrip()) - 1  # printed as it came, not at the end


def test_text_stream_that_cannot_extend_its_text_prints_it_whole():
  class Rewriting:
    def decode(self, token_ids, skip_special_tokens=True):
      return 'abc' if len(token_ids) < 3 else 'xyz!'

  out = io.StringIO()
  stream = generate.TextStream(Rewriting(), out)
  for token in range(4):
    stream([token])
  stream.finish('xyz!')
  assert out.getvalue() == 'abc\nxyz!\n'
