"""The flags both CLIs share (model, sampling, strategy settings) and their conversions.

Defined once here; `clasp_jax.cli.generate` and `clasp_jax.cli.bench` import this module. Bad
input, whether caught by absl while parsing flags or raised as ValueError by the library, ends a
CLI with one line `error: <reason>` on stderr and exit code 2, before any model compile.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import os
import sys
from typing import Any, NoReturn

from absl import flags
from absl import logging

from clasp_jax import sharding
from clasp_jax import strategies
from clasp_jax.sampling import SamplingConfig

USAGE_ERROR_CODE = 2

_DTYPES = ('float32', 'bfloat16', 'auto')

flags.DEFINE_string('model', None, 'GGUF file or Hugging Face folder; unset: the embedded '
                    'SmolLM2-135M-Instruct.')
flags.DEFINE_enum('dtype', 'auto', _DTYPES, 'Parameter dtype; auto: float32 on CPU, bfloat16 on '
                  'accelerators.')
flags.DEFINE_string('cache_dir', '~/.cache/clasp_jax', 'Cache of converted weights; empty: no '
                    'cache.')
flags.DEFINE_string('mesh', None, "Devices to shard the model over, tensor parallel: 'tp:N' (N "
                    "devices), 'auto' (every device) or unset (one device).")
flags.DEFINE_integer('max_new_tokens', 256, 'Most new tokens per generation (per turn in '
                     'clasp-bench).', lower_bound=1)
flags.DEFINE_float('temperature', 0.0, '0: greedy; otherwise the sampling temperature.')
flags.DEFINE_integer('top_k', 0, 'Sample from the k most likely tokens (0: all).')
flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass (1: all tokens).')
flags.DEFINE_integer('seed', 0, 'PRNG seed of sampling.')
flags.DEFINE_string('skip_layers', None, "M, the number of layers the draft skips, or 'auto' "
                    '(clasp: M chosen online to maximise tokens/s, falling back to plain '
                    'decoding when drafting does not pay; the default when --skip_ratio is '
                    'unset too).')
flags.DEFINE_float('skip_ratio', None, 'M as a fraction of the layers, when --skip_layers is '
                   f'unset (default {strategies.DEFAULT_SKIP_RATIO}).')
flags.DEFINE_list('skip_set', None, 'Comma-separated layer indices the static draft skips; '
                  'unset: M layers spread evenly.')
flags.DEFINE_integer('num_draft_tokens', strategies.DEFAULT_NUM_DRAFT_TOKENS,
                     'K, the most draft tokens per round.')
flags.DEFINE_float('draft_exit_threshold', strategies.DEFAULT_DRAFT_EXIT_THRESHOLD,
                   'DET: a layer-skip draft stops when its top probability falls below this.')
flags.DEFINE_integer('loi', strategies.DEFAULT_LOI, 'CLaSp re-optimises its skip set every LOI '
                     'rounds.')

# ConfLayers' search (--method=conflayers); defaults are the published ones (`ConfLayers`).
_CONFLAYERS = strategies.ConfLayers()
flags.DEFINE_integer('conflayers_window', _CONFLAYERS.window, 'ConfLayers: W, the last generated '
                     'tokens its confidence forward runs over.', lower_bound=1)
flags.DEFINE_float('conflayers_skip_ratio', _CONFLAYERS.skip_ratio, 'ConfLayers: r, the least '
                   'skip ratio (skipped / (L - 2)) a selection aims for.')
flags.DEFINE_float('conflayers_ratio_band', _CONFLAYERS.ratio_band, 'ConfLayers: a selection '
                   'aims for a skip ratio in [r, r + this].')
flags.DEFINE_float('conflayers_initial_lambda', _CONFLAYERS.initial_lambda, 'ConfLayers: lambda '
                   'of the first selection (skip a layer below mean - lambda * std of its '
                   'window).')
flags.DEFINE_float('conflayers_lambda_step', _CONFLAYERS.lambda_step, 'ConfLayers: how far '
                   'lambda moves per step towards the skip-ratio band.')
flags.DEFINE_integer('conflayers_lambda_max_steps', _CONFLAYERS.lambda_max_steps, 'ConfLayers: '
                     'the most lambda steps per selection.', lower_bound=0)
flags.DEFINE_integer('conflayers_eval_rounds', _CONFLAYERS.eval_rounds, 'ConfLayers: drafting '
                     'rounds that evaluate one skip set.', lower_bound=1)
flags.DEFINE_integer('conflayers_early_rounds', _CONFLAYERS.early_rounds, 'ConfLayers: rounds '
                     'after which a poor skip set is replaced early.', lower_bound=1)
flags.DEFINE_float('conflayers_early_min_accepted', _CONFLAYERS.early_min_accepted, 'ConfLayers: '
                   'mean accepted drafts per round (bonus token excluded) below which a skip set '
                   'is poor.')
flags.DEFINE_float('conflayers_stop_accepted', _CONFLAYERS.stop_accepted, 'ConfLayers: the '
                   'search keeps a set whose mean accepted drafts per round (bonus token '
                   'excluded) exceed this, if its acceptance rate also passes its threshold.')
flags.DEFINE_float('conflayers_stop_acceptance', _CONFLAYERS.stop_acceptance, 'ConfLayers: the '
                   'search keeps a set whose mean acceptance rate (accepted drafts / drafted) '
                   'exceeds this, if its accepted drafts also pass their threshold.')
flags.DEFINE_integer('conflayers_max_iterations', _CONFLAYERS.max_iterations, 'ConfLayers: the '
                     'most skip sets tried before settling on the best.', lower_bound=1)
# The `ConfLayers` fields that the flags above set, each as --conflayers_<field>.
_CONFLAYERS_SETTINGS = ('window', 'skip_ratio', 'ratio_band', 'initial_lambda', 'lambda_step',
                        'lambda_max_steps', 'eval_rounds', 'early_rounds', 'early_min_accepted',
                        'stop_accepted', 'stop_acceptance', 'max_iterations')

FLAGS = flags.FLAGS


def fail(reason: str) -> NoReturn:
  """Prints `error: <reason>` to stderr and exits with the usage-error code."""
  print(f'error: {reason}', file=sys.stderr)
  sys.exit(USAGE_ERROR_CODE)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """`absl.app.run`'s flags_parser: a flag error becomes `error: ...` and exit code 2.

  Also keeps the INFO logs of JAX and orbax quiet unless --verbosity asks for them (absl.app
  shows INFO when --verbosity is left at its default).
  """
  try:
    remaining = FLAGS(argv)
  except flags.Error as e:
    fail(str(e))
  if FLAGS['verbosity'].using_default_value:
    logging.set_verbosity(logging.WARNING)
  return remaining


@contextlib.contextmanager
def usage_errors(argv: Sequence[str]) -> Iterator[None]:
  """Turns stray arguments and the library's ValueErrors into `error: ...` and exit code 2."""
  try:
    if len(argv) > 1:
      raise ValueError(f'unexpected arguments: {" ".join(argv[1:])} (flags are --name=value)')
    yield
  except ValueError as e:
    fail(str(e))


def load_kwargs() -> dict[str, Any]:
  """The keyword arguments of `weights.load` from --model, --dtype, --cache_dir and --mesh.

  First joins a multi-host job when the environment describes one (TPU slices, SLURM: see
  `sharding.maybe_initialize_distributed`), so that the mesh spans every host's devices.

  Raises:
    ValueError: for a bad --mesh, or one of more devices than there are.
  """
  sharding.maybe_initialize_distributed()
  return dict(path=os.path.expanduser(FLAGS.model) if FLAGS.model else None,
              dtype=None if FLAGS.dtype == 'auto' else FLAGS.dtype,
              cache_dir=os.path.expanduser(FLAGS.cache_dir) if FLAGS.cache_dir else None,
              mesh=sharding.make_mesh(FLAGS.mesh))


def sampling_config() -> SamplingConfig:
  """The sampling settings (validated, so bad values fail before the model loads)."""
  return SamplingConfig(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p)


def strategy_kwargs() -> dict[str, Any]:
  """The keyword arguments of `strategies.build` from the strategy flags.

  Raises:
    ValueError: when --skip_set holds something other than integers.
  """
  return dict(skip_layers=parse_skip_layers(FLAGS.skip_layers), skip_ratio=FLAGS.skip_ratio,
              skip_set=_layer_indices(FLAGS.skip_set),
              num_draft_tokens=FLAGS.num_draft_tokens,
              draft_exit_threshold=FLAGS.draft_exit_threshold, loi=FLAGS.loi,
              cost_cache_dir=os.path.expanduser(FLAGS.cache_dir) if FLAGS.cache_dir else None,
              conflayers_settings={name: FLAGS[f'conflayers_{name}'].value
                                   for name in _CONFLAYERS_SETTINGS})


def parse_skip_layers(value: str | None) -> int | str | None:
  """An integer M, 'auto' or None (unset)."""
  if value is None or value == 'auto':
    return value
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"skip_layers must be an integer or 'auto', got {value!r}") from None


def _layer_indices(items: list[str] | None) -> tuple[int, ...] | None:
  if items is None:
    return None
  try:
    return tuple(int(item) for item in items)
  except ValueError:
    raise ValueError(f'--skip_set must list layer indices, like 3,7,12; got '
                     f'{",".join(items)}') from None
