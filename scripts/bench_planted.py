"""CLaSp end to end on planted models: an epsilon sweep of every method (clasp_jax/bench).

  # One H200, the 8B shape in bfloat16 (per-layer weights, as the accelerator path runs them)
  python scripts/bench_planted.py --preset=llama3-8b --out=docs/results/h200/planted_8b.json

  # The 70B shape: 141 GB of bfloat16 weights, built one layer at a time on the device
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.99 python scripts/bench_planted.py --preset=llama3-70b \
      --out=docs/results/h200/planted_70b.json

  # 44 of its 80 layers planted (the paper's best M for LLaMA-3-70B), CLaSp at M = 44
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.99 python scripts/bench_planted.py --preset=llama3-70b \
      --planted_fraction=0.55 --epsilons=0 --methods=vanilla,clasp-planted,static \
      --out=runs/planted_70b/planted_m44.json

  # The 70B shape tensor-parallel over two GPUs, each weight built in its shards
  python scripts/bench_planted.py --preset=llama3-70b --mesh=tp:2 \
      --out=runs/planted_70b/planted.json

  # A quick CPU run at a reduced shape
  python scripts/bench_planted.py --shape=num_layers=16,hidden_size=256,num_heads=4,\
num_kv_heads=2,head_dim=64,intermediate_size=768,vocab_size=8192 --max_new_tokens=96 \
      --num_prompts=2 --out=runs/planted_cpu/planted.json

Writes the sweep as JSON (with the command, versions and device), a markdown table beside it
(.md) and a plot of speedup against tau per method beside the CLaSp paper's points (.png).
"""

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

from absl import app
from absl import flags
import jax
import jaxlib

from clasp_jax import model
from clasp_jax import sharding
from clasp_jax import weights
from clasp_jax.bench import planted
from clasp_jax.bench import planted_sweep
from clasp_jax.configs import models

_PRESET = flags.DEFINE_enum('preset', 'llama3.2-1b', list(models.PRESETS),
                            'Model shape (its LM head is untied: see clasp_jax/bench/planted.py).')
_SHAPE = flags.DEFINE_list('shape', [], 'LlamaConfig fields to override, name=value (e.g. '
                           'num_layers=16,hidden_size=256): a reduced shape for CPU runs.')
_EPSILONS = flags.DEFINE_list('epsilons', ['0', '0.02', '0.05', '0.1', '0.2', '0.4', '1'],
                              'Factors on the planted layers\' output projections (1: nothing '
                              'planted).')
_METHODS = flags.DEFINE_list('methods', list(planted_sweep.DEFAULT_METHODS),
                             f'From {",".join(planted_sweep.METHODS)} (vanilla always runs).')
_STATIC_SET = flags.DEFINE_enum('static_set', 'planted', list(planted_sweep.STATIC_SETS),
                                'Static skips the planted set, or 0.5 L layers spread evenly.')
_FRACTION = flags.DEFINE_float('planted_fraction', planted.DEFAULT_PLANTED_FRACTION,
                               'Share of the layers planted (inner layers, drawn at random).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the weights, the planted set and the prompts.')
_NUM_PROMPTS = flags.DEFINE_integer('num_prompts', 4, 'Timed prompts per point.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 64, 'Tokens per prompt.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 256, 'New tokens per generation.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed generations per method and point.')
_K = flags.DEFINE_integer('num_draft_tokens', 8, 'K, the most drafts per round.')
_DET = flags.DEFINE_float('draft_exit_threshold', 0.7, 'DET of the layer-skip drafts.')
_LOI = flags.DEFINE_integer('loi', 4, 'CLaSp rounds between DP refreshes.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0: greedy (and the losslessness '
                                  'check); otherwise speculative sampling at this temperature.')
_DTYPE = flags.DEFINE_enum('dtype', 'auto', ['auto', 'float32', 'bfloat16'],
                           'auto: float32 on CPU, bfloat16 on accelerators.')
_LAYOUT = flags.DEFINE_enum('layout', 'auto', ['auto', 'stacked', 'per_layer'],
                            'Params layout; auto: per layer (fused) on accelerators.')
_COST_CACHE = flags.DEFINE_string('cost_cache_dir', '', 'Where auto keeps its measured step '
                                  'costs; "": a fresh folder, so they are measured once per run '
                                  '(by the engine being benchmarked) and shared by its points.')
_XLA_CACHE = flags.DEFINE_string('compilation_cache_dir', '', 'JAX\'s persistent compilation '
                                 'cache, where every point after the first finds the programs '
                                 'its new decoders compile; "": a fresh folder.')
_MESH = flags.DEFINE_string('mesh', '', "Run tensor-parallel: 'tp:N' (N devices) or 'auto' "
                            '(every device); the params are built in their shards (per-layer '
                            'layout). Unset: one device.')
_OUT = flags.DEFINE_string('out', '', 'JSON output path (.md and .png written beside it).')
for _field in ('embed_std', 'qk_gain', 'attn_gain', 'mlp_gain', 'logit_std'):
  flags.DEFINE_float(_field, getattr(planted.PlantedModel, _field),
                     f'PlantedModel.{_field} (see clasp_jax/bench/planted.py).')


def _config():
  config = models.PRESETS[_PRESET.value]()
  overrides = {}
  for item in _SHAPE.value:
    name, _, value = item.partition('=')
    kind = type(getattr(config, name, None))
    if kind not in (int, float) or not value:
      raise app.UsageError(f'--shape: {item!r} is not name=value of a numeric LlamaConfig '
                           f'field')
    overrides[name] = kind(value)
  return dataclasses.replace(config, **overrides)


def _commit() -> str:
  """The checkout's commit, '-dirty' when its files differ from it (then the commit alone does
  not say what ran)."""
  try:
    return subprocess.run(['git', 'describe', '--always', '--dirty', '--abbrev=40'],
                          capture_output=True, text=True,
                          check=True, cwd=os.path.dirname(os.path.abspath(__file__))
                          ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def main(argv):
  del argv
  try:  # the library's own checks, before anything compiles
    config = _config()
    planted_sweep.method_specs(planted.planted_model(config, epsilon=1.0), _METHODS.value,
                               _STATIC_SET.value)
    settings = planted_sweep.SweepSettings(
        max_new_tokens=_MAX_NEW.value, warmup=_WARMUP.value, num_draft_tokens=_K.value,
        draft_exit_threshold=_DET.value, loi=_LOI.value, temperature=_TEMPERATURE.value,
        dtype=weights.default_dtype().name if _DTYPE.value == 'auto' else _DTYPE.value,
        per_layer=((model.per_layer_by_default() or bool(_MESH.value))
                   if _LAYOUT.value == 'auto' else _LAYOUT.value == 'per_layer'),
        cost_cache_dir=_COST_CACHE.value or tempfile.mkdtemp(prefix='clasp_costs_'),
        mesh=_MESH.value)
    sharding.check(config, sharding.make_mesh(_MESH.value))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  jax.config.update('jax_compilation_cache_dir',
                    _XLA_CACHE.value or tempfile.mkdtemp(prefix='clasp_xla_'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  knobs = {f: flags.FLAGS[f].value for f in ('embed_std', 'qk_gain', 'attn_gain', 'mlp_gain',
                                              'logit_std')}
  sweep = planted_sweep.run_sweep(
      config, [float(e) for e in _EPSILONS.value], _METHODS.value, settings=settings,
      num_prompts=_NUM_PROMPTS.value, prompt_len=_PROMPT_LEN.value,
      static_set=_STATIC_SET.value, fraction=_FRACTION.value, seed=_SEED.value, knobs=knobs,
      log=lambda line: print(line, flush=True))
  sweep['meta'] = dict(
      command=' '.join(sys.argv), preset=_PRESET.value, commit=_commit(),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
      backend=jax.default_backend(), device=jax.devices()[0].device_kind,
      num_devices=jax.device_count())
  table = planted_sweep.markdown(sweep)
  print(table)
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
    stem = os.path.splitext(_OUT.value)[0]
    with open(_OUT.value, 'w') as f:
      json.dump(sweep, f, indent=1)
    with open(stem + '.md', 'w') as f:
      f.write(f"`{sweep['meta']['command']}`\n\n{table}\n")
    planted_sweep.plot(sweep, stem + '.png')


if __name__ == '__main__':
  app.run(main)
