"""Times the pieces of a CLaSp round on this device for preset shapes (random weights).

  python scripts/bench_mechanics.py --presets=smollm2-135m,llama3.2-1b,llama3-8b \
      --contexts=1024,4096 --out=docs/results/h100/mechanics.json
"""

import json
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from clasp_jax import sharding
from clasp_jax.bench import mechanics
from clasp_jax.configs import models

_PRESETS = flags.DEFINE_list('presets', ['smollm2-135m', 'llama3.2-1b', 'llama3-8b',
                                         'llama3-70b'], 'Model shapes to time.')
_CONTEXTS = flags.DEFINE_list('contexts', ['1024', '4096'], 'KV cache lengths.')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'Weight dtype.')
_REPS = flags.DEFINE_integer('reps', 20, 'Timed calls per measurement (median reported).')
_OUT = flags.DEFINE_string('out', '', 'Write the JSON results here (and a .md beside it).')


def main(argv):
  del argv
  unknown = set(_PRESETS.value) - set(models.PRESETS)
  if unknown:
    raise app.UsageError(f'unknown presets {sorted(unknown)}; known: {sorted(models.PRESETS)}')
  dtype = jnp.dtype(_DTYPE.value)
  rows, skipped = [], []
  for name in _PRESETS.value:
    config = models.PRESETS[name]()
    try:
      sharding.check(config, sharding.make_mesh('auto'))
    except ValueError as e:
      skipped.append(f'{name}: {e}')
      print('skipped:', skipped[-1], flush=True)
      continue
    for context in map(int, _CONTEXTS.value):
      if not mechanics.fits(config, context, dtype.itemsize):
        skipped.append(f'{name} ctx {context}: does not fit {jax.device_count()} device(s)')
        print('skipped:', skipped[-1], flush=True)
        continue
      rows.append(mechanics.measure_shape(name, config, context, dtype=dtype,
                                          reps=_REPS.value))
      print(json.dumps(rows[-1]), flush=True)
  projections = [
      dict(preset=r['preset'], context=r['context'], tau=tau, paper_speedup=paper['speedup'],
           projected_speedup=mechanics.project_speedup(r, tau))
      for r in rows if (paper := mechanics.PAPER.get(r['preset'])) for tau in paper['tau']]
  table = mechanics.markdown(rows)
  print(table)
  for p in projections:
    print(f"PROJECTION {p['preset']} ctx {p['context']} tau {p['tau']}: "
          f"{p['projected_speedup']:.2f}x (paper measured overall {p['paper_speedup']}x)")
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
    meta = dict(jax_version=jax.__version__, device=jax.devices()[0].device_kind,
                num_devices=jax.device_count(), dtype=_DTYPE.value)
    with open(_OUT.value, 'w') as f:
      json.dump(dict(meta=meta, rows=rows, skipped=skipped, projections=projections), f,
                indent=1)
    with open(os.path.splitext(_OUT.value)[0] + '.md', 'w') as f:
      f.write(table + '\n')


if __name__ == '__main__':
  app.run(main)
