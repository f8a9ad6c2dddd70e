"""The flags both CLIs share (model, sampling, strategy settings), their conversions, and what
the CLIs have in common: running under absl, loading the model, saying what they are doing.

Defined once here; `clasp_jax.cli.generate` and `clasp_jax.cli.bench` import this module. Bad
input, whether caught by absl while parsing flags or raised as ValueError by the library, ends a
CLI with one line `error: <reason>` on stderr and exit code 2, before any model compile.
Progress messages go to stderr, one line each, unless --quiet is given; stdout holds only the
results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping, Sequence
import contextlib
import os
import sys
from typing import Any, NoReturn

from absl import app
from absl import flags
from absl import logging
import jax.numpy as jnp
import numpy as np

from clasp_jax import model as model_lib
from clasp_jax import sharding
from clasp_jax import strategies
from clasp_jax import weights
from clasp_jax import widths
from clasp_jax import engine
from clasp_jax.sampling import SamplingConfig
from clasp_jax.weights import store

USAGE_ERROR_CODE = 2
#: How JAX is told whether to reserve the accelerator's memory at start (read when its
#: backend starts).
_PREALLOCATE_VARIABLE = 'XLA_PYTHON_CLIENT_PREALLOCATE'

_DTYPES = ('float32', 'bfloat16', 'auto')

flags.DEFINE_string('model', None, 'GGUF file or Hugging Face folder; unset: the embedded '
                    'SmolLM2-135M-Instruct.')
flags.DEFINE_enum('dtype', 'auto', _DTYPES, 'Parameter dtype; auto: float32 on CPU, bfloat16 on '
                  'accelerators.')
flags.DEFINE_string('cache_dir', '~/.cache/clasp_jax', 'Cache of converted weights; empty: no '
                    'cache.')
flags.DEFINE_bool('quiet', False, 'Print no progress messages (loading, converting, compiling) '
                  'to stderr.')
flags.DEFINE_bool('preallocate', False, "Let XLA reserve most of the accelerator's memory as the "
                  'process starts (its own default); off, memory is taken as it is needed, '
                  'which starts a process about 2 s sooner on an H200. Unset, the environment\'s '
                  'XLA_PYTHON_CLIENT_PREALLOCATE applies when it is set.')
flags.DEFINE_string('mesh', None, "Devices to shard the model over, tensor parallel: 'tp:N' (N "
                    "devices), 'auto' (every device) or unset (one device).")
flags.DEFINE_integer('max_new_tokens', 256, 'Most new tokens per generation (per turn in '
                     'clasp-bench).', lower_bound=1)
flags.DEFINE_integer('pass_width', None, "Rows of every full-model pass; unset: the platform's "
                     f'({widths.CPU_PASS_WIDTH} on a CPU, {widths.DEFAULT_PASS_WIDTH} on '
                     'accelerators); --num_draft_tokens unset follows it. Methods give the same '
                     'tokens only at one width. On a CPU, 1 made plain decoding 1.35x faster '
                     'than 3 (a 2-core Xeon) and drafting far slower (K + 1 passes a verify): for '
                     'plain decoding alone.', lower_bound=1)
flags.DEFINE_enum('attention', 'auto', ('auto', 'xla', 'pallas'), "The cache attention: 'xla' "
                  "the plain jnp version (the reference), 'pallas' the fused GPU kernel; auto: "
                  'the kernel on GPUs, else the jnp version.')
flags.DEFINE_enum('cpu_kernel', 'auto', ('auto', 'on', 'off'), "On a CPU, a float32 pass's "
                  "products by the project's C++ kernel (built at first use with $CXX) or, off, "
                  "by XLA's; auto: the kernel where it can be built, on one device. Methods give "
                  'the same tokens only with one choice.')
flags.DEFINE_enum('rows_apart', 'auto', ('auto', 'on', 'off'), 'On a CPU in float32 with the '
                  "kernels: every pass computes each row as a 1-row pass would, so that plain "
                  "steps run as 1-row passes beside wider verify passes, tokens unchanged; on: an "
                  "error where it cannot; auto: wherever it can. Methods give the same tokens "
                  'only with one choice.')
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
flags.DEFINE_integer('num_draft_tokens', None,
                     'K, the most draft tokens per round; unset: as many as one pass verifies '
                     '(--pass_width - 1), at most '
                     f'{strategies.MAX_DEFAULT_NUM_DRAFT_TOKENS}: '
                     f'{strategies.default_num_draft_tokens(widths.DEFAULT_PASS_WIDTH)} on '
                     f'accelerators, {strategies.default_num_draft_tokens(widths.CPU_PASS_WIDTH)} '
                     'on a CPU.')
flags.DEFINE_float('draft_exit_threshold', strategies.DEFAULT_DRAFT_EXIT_THRESHOLD,
                   'DET: a layer-skip draft stops when its top probability falls below this.')
flags.DEFINE_integer('loi', strategies.DEFAULT_LOI, 'CLaSp re-optimises its skip set every LOI '
                     'rounds, rounds with a lookup match not counted (with M auto, at first: '
                     'the interval doubles while the set holds).')
flags.DEFINE_bool('lookup', True, 'clasp: take a round\'s drafts from the context when it has an '
                  'n-gram match (prompt lookup) and draft with layers skipped otherwise; '
                  '--nolookup: the paper\'s CLaSp, layer-skip drafts only.')
flags.DEFINE_bool('dp_in_verify', True, 'clasp: fill the DP\'s table inside the verify passes, '
                  'in the rows they pad (a refresh then reads the newest complete table); '
                  '--nodp_in_verify: the DP as a pass of its own at every refresh (the paper\'s).')

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

EMBEDDED_MODEL_NAME = 'the embedded SmolLM2-135M-Instruct'
# The file `weights.store` writes last into a cache entry: its presence marks a complete entry.
_CACHE_ENTRY_MARK = 'config.json'


def run(main: Callable[[list[str]], None], cli_module: str) -> None:
  """Runs a CLI's `main` under absl, with a --help that lists the CLI's own flags.

  absl's --help prints the docstring of `__main__` and the key flags of the module named by
  sys.argv[0]; behind a console script (`clasp-generate`) both are pip's entry-point shim, which
  has neither, so --help listed no flag at all. The CLI module's key flags (its own and those it
  adopted from this module) are therefore registered as key flags of sys.argv[0] too, and its
  docstring becomes the usage text. --helpfull still lists every flag, absl's and orbax's
  included.

  Args:
    main: the CLI's main function, given the arguments left after parsing flags.
    cli_module: the CLI module's `__name__`.
  """
  module = sys.modules[cli_module]
  for flag in FLAGS.get_key_flags_for_module(module):
    FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  sys.modules['__main__'].__doc__ = module.__doc__
  app.run(main, flags_parser=parse_flags)


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


def progress(message: str) -> None:
  """Says on stderr what the CLI is doing, one line, unless --quiet is given."""
  if not FLAGS.quiet:
    print(message, file=sys.stderr, flush=True)


def cache_dir() -> str | None:
  """--cache_dir with `~` expanded, created if missing; None when --cache_dir is empty.

  Checked before the model loads, so that a folder that cannot be made is a usage error, not a
  traceback after a long conversion.

  Raises:
    ValueError: when the folder cannot be created or written to.
  """
  if not FLAGS.cache_dir:
    return None
  path = os.path.expanduser(FLAGS.cache_dir)
  try:
    os.makedirs(path, exist_ok=True)
  except FileExistsError:
    raise ValueError(f'--cache_dir={FLAGS.cache_dir}: exists and is not a folder') from None
  except OSError as e:
    raise ValueError(f'--cache_dir={FLAGS.cache_dir}: cannot create it ({e.strerror})') from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise ValueError(f'--cache_dir={FLAGS.cache_dir}: not writable')
  return path


def model_name() -> str:
  """The model as the user named it: --model as given, or the embedded model."""
  return FLAGS.model or EMBEDDED_MODEL_NAME


def load_kwargs() -> dict[str, Any]:
  """The keyword arguments of `weights.load` from --model, --dtype, --cache_dir and --mesh, and
  the layer layout that --pass_width's decoders run on (so that no second copy is made).

  First joins a multi-host job when the environment describes one (TPU slices, SLURM: see
  `sharding.maybe_initialize_distributed`), so that the mesh spans every host's devices.

  Raises:
    ValueError: for a --cache_dir that cannot be created (see `cache_dir`), a bad --mesh, or
      one of more devices than there are.
  """
  sharding.maybe_initialize_distributed()
  set_preallocation()
  return dict(path=os.path.expanduser(FLAGS.model) if FLAGS.model else None,
              dtype=None if FLAGS.dtype == 'auto' else FLAGS.dtype, cache_dir=cache_dir(),
              mesh=sharding.make_mesh(FLAGS.mesh),
              per_layer=model_lib.per_layer_by_default(FLAGS.pass_width))


def set_preallocation(environ: MutableMapping[str, str] = os.environ) -> None:
  """Tells JAX whether to reserve most of the accelerator's memory at start, as --preallocate
  says; must run before anything starts a device backend, which reads the setting then.

  Reserving it (XLA's default) cost a CLI process about 2 s of its start on an H200, paid at
  its first transfer (docs/results/h200/cold_start_24ecb83); memory taken as needed stays
  with JAX's allocator for reuse, and decoding was as fast. An explicit --[no]preallocate overrides XLA_PYTHON_CLIENT_PREALLOCATE; an unset one only
  fills it in.
  """
  setting = 'true' if FLAGS.preallocate else 'false'
  if FLAGS['preallocate'].present:
    environ[_PREALLOCATE_VARIABLE] = setting
  else:
    environ.setdefault(_PREALLOCATE_VARIABLE, setting)


def load_model() -> weights.LoadedModel:
  """Loads the model as the flags say, saying what happens (see `progress`).

  The first load of a checkpoint converts it (dequantising a GGUF file, transposing a Hugging
  Face folder's matrices), which takes a while; later loads read the converted weights from
  --cache_dir.

  Raises:
    ValueError: for a missing or unreadable model, or a --cache_dir that cannot be created.
  """
  kwargs = load_kwargs()
  if kwargs['cache_dir'] is not None:
    engine.enable_compilation_cache(kwargs['cache_dir'])
  progress(f'loading {model_name()} ...')
  source = os.path.abspath(kwargs['path'] or weights.embedded_model_path())
  if os.path.exists(source):  # Otherwise `weights.load` says what is wrong.
    kind = 'GGUF' if os.path.isfile(source) else 'Hugging Face checkpoint'
    if kwargs['cache_dir'] is None:
      progress(f'converting the {kind} (every run: --cache_dir is empty) ...')
    elif not _is_cached(source, kwargs['dtype'], kwargs['cache_dir']):
      progress(f'converting the {kind} (first run only; cached under {FLAGS.cache_dir}) ...')
  return weights.load(**kwargs)


def _is_cached(source: str, dtype: str | None, cache_dir_path: str) -> bool:
  """Whether `weights.load` will find `source`'s converted weights in the cache."""
  dtype = np.dtype(weights.default_dtype() if dtype is None else jnp.dtype(dtype))
  entry = os.path.join(cache_dir_path, store.cache_key(source, dtype))
  return os.path.isfile(os.path.join(entry, _CACHE_ENTRY_MARK))


def decoder_kwargs() -> dict[str, Any]:
  """The keyword arguments of `make_decoder` that say how a decoder's passes run (the same for
  every method of a run, so that they compare exactly): --pass_width, --attention,
  --cpu_kernel and --rows_apart.

  Raises:
    ValueError: for --attention=pallas on a machine without a GPU.
  """
  blocker = engine.attention_blocker(FLAGS.attention)
  if blocker:  # before the model loads
    raise ValueError(blocker)
  choice = dict(auto=None, on=True, off=False)
  return dict(pass_width=FLAGS.pass_width, attention=FLAGS.attention,
              cpu_kernel=choice[FLAGS.cpu_kernel], rows_apart=choice[FLAGS.rows_apart])


def sampling_config() -> SamplingConfig:
  """The sampling settings (validated, so bad values fail before the model loads)."""
  return SamplingConfig(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p)


def strategy_kwargs() -> dict[str, Any]:
  """The keyword arguments of `strategies.build` from the strategy flags.

  Raises:
    ValueError: when --skip_set holds something other than integers, or --cache_dir cannot be
      created.
  """
  return dict(skip_layers=parse_skip_layers(FLAGS.skip_layers), skip_ratio=FLAGS.skip_ratio,
              skip_set=_layer_indices(FLAGS.skip_set),
              num_draft_tokens=FLAGS.num_draft_tokens,
              draft_exit_threshold=FLAGS.draft_exit_threshold, loi=FLAGS.loi,
              lookup=FLAGS.lookup, dp_in_verify=FLAGS.dp_in_verify, cost_cache_dir=cache_dir(),
              conflayers_settings={name: FLAGS[f'conflayers_{name}'].value
                                   for name in _CONFLAYERS_SETTINGS})


def parse_bool(value: str) -> bool:
  """true/false (also 1/0, yes/no), for settings given as text."""
  words = {'true': True, '1': True, 'yes': True, 'false': False, '0': False, 'no': False}
  if value.lower() not in words:
    raise ValueError(f'expected true or false, got {value!r}')
  return words[value.lower()]


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
