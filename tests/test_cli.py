"""The CLIs reject bad input with `error: <reason>` and exit code 2, before compiling a model."""

import os
import subprocess
import sys

import pytest

from clasp_jax.cli import bench

# JAX logs every compilation, so the tests can tell that none happened.
_ENV = dict(os.environ, JAX_LOG_COMPILES='1', JAX_PLATFORMS='cpu')


def _run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True,
                        env=_ENV, timeout=120, check=False)


def _assert_usage_error(result: subprocess.CompletedProcess, reason: str) -> None:
  assert result.returncode == 2, result.stderr
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith('error: ') and reason in last_line, result.stderr
  assert result.stdout == ''


@pytest.mark.parametrize('args, reason', [
    (['--prompt='], 'the prompt is empty'),
    (['--max_new_tokens=100'], '--prompt must have a value'),
    (['--prompt=hi', '--max_new_tokens=-1'], '--max_new_tokens=-1'),
    (['--prompt=hi', '--temperature=-1'], 'temperature must be >= 0'),
    (['--prompt=hi', '--temperature=1', '--top_p=1.5'], 'top_p must be in (0, 1]'),
    (['--prompt=hi', '--method=static', '--skip_set=2,x'], '--skip_set must list layer indices'),
    (['--prompt=hi', '--model=/nope'], '/nope: no such file or directory'),
])
def test_generate_rejects_before_loading(args, reason):
  result = _run_cli('clasp_jax.cli.generate', *args)
  _assert_usage_error(result, reason)
  assert 'Compiling' not in result.stderr


def test_generate_rejects_too_many_skipped_layers_before_compiling():
  result = _run_cli('clasp_jax.cli.generate', '--prompt=hi', '--skip_layers=1000',
                    '--cache_dir=')
  _assert_usage_error(result, 'skip_layers (M) must be in [0, L)')
  assert 'Compiling jit(_prefill)' not in result.stderr


@pytest.mark.parametrize('args, reason', [
    (['--methods=vanilla,beam'], "unknown method 'beam'"),
    (['--methods=clasp:depth=3'], "method 'clasp:depth=3': expected setting=value"),
    (['--methods=clasp:skip_layers=x'], "skip_layers must be an integer or 'auto'"),
    (['--methods=vanilla:loi=2'], 'vanilla takes no settings'),
    (['--questions=/nope.jsonl'], 'questions file /nope.jsonl does not exist'),
    (['--num_questions=0'], '--num_questions=0'),
])
def test_bench_rejects_before_loading(args, reason):
  result = _run_cli('clasp_jax.cli.bench', *args)
  _assert_usage_error(result, reason)
  assert 'Compiling' not in result.stderr


def test_method_variants_override_flags_for_one_method():
  assert bench.parse_method('clasp:skip_layers=4:loi=1') == ('clasp', dict(skip_layers=4, loi=1))
  assert bench.parse_method('clasp:skip_layers=auto') == ('clasp', dict(skip_layers='auto'))
  assert bench.methods_to_run(['clasp:skip_layers=2', 'pld', 'pld']) == [
      'vanilla', 'clasp:skip_layers=2', 'pld']
