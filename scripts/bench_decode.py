"""Decode speed through `Decoder.generate` on random weights of preset shapes, against the
weight-bytes roofline; optionally beside an older checkout measured in the same run.

  python scripts/bench_decode.py --presets=smollm2-135m,llama3-8b --contexts=1024,4096 \
      --baseline=/path/to/older/checkout --out=docs/results/h200/decode.json
  python scripts/bench_decode.py --presets=llama3-8b,llama3-70b --mesh=none,tp:2

Writes the rows as JSON and a markdown table beside it (`.md`), and prints the table. See
`clasp_jax/bench/decode.py` for what each figure is.
"""

import dataclasses
import json
import os

from absl import app
from absl import flags

from clasp_jax import sharding
from clasp_jax.bench import decode
from clasp_jax.configs import models

_PRESETS = flags.DEFINE_list('presets', ['smollm2-135m', 'llama3-8b'], 'Model shapes.')
_CONTEXTS = flags.DEFINE_list('contexts', ['1024'], 'Tokens in the cache while decoding.')
_WHAT = flags.DEFINE_list('what', ['plain', 'draft', 'refresh'], 'plain: plain decoding; '
                          'draft: static M = L/2, DET 0; refresh: CLaSp M = L/2, LOI 1.')
_ATTENTION = flags.DEFINE_list('attention', ['auto'], "The new engine's cache attention: auto, "
                               'xla, pallas (each measured).')
_BASELINE = flags.DEFINE_string('baseline', None, 'An older checkout to measure beside this '
                                'one (its plain and draft cases).')
_MESH = flags.DEFINE_list('mesh', ['none'], "Where this commit's engine runs, each measured: "
                          'none (one device), tp:N or auto (every device), tensor parallel.')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'Weight dtype.')
_SHORT = flags.DEFINE_integer('short', 32, 'New tokens of the short generation.')
_LONG = flags.DEFINE_integer('long', 160, 'New tokens of the long generation.')
_REPS = flags.DEFINE_integer('reps', 3, 'Timed generations per length (median).')
_OUT = flags.DEFINE_string('out', '', 'Write the JSON rows here (and a .md table beside it).')


def main(argv):
  del argv
  unknown = set(_PRESETS.value) - set(models.PRESETS)
  if unknown:
    raise app.UsageError(f'unknown presets {sorted(unknown)}; known: {sorted(models.PRESETS)}')
  try:
    meshes = ['' if m == 'none' else str(sharding.parse_mesh(m)) for m in _MESH.value]
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  configs = {p: dataclasses.asdict(models.PRESETS[p]()) for p in _PRESETS.value}
  cases = [decode.Case(p, int(c), w, a) for p in _PRESETS.value for c in _CONTEXTS.value
           for w in _WHAT.value for a in _ATTENTION.value]
  settings = dict(dtype=_DTYPE.value, short=_SHORT.value, long=_LONG.value, reps=_REPS.value)
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  rows = []
  for mesh in meshes:  # a worker each: one model in memory at a time
    rows += decode.run_engine(here, 'this commit', cases, configs, mesh=mesh, **settings)
  if _BASELINE.value:
    old = [dataclasses.replace(c, attention='auto') for c in cases
           if c.what != 'refresh' and c.attention == _ATTENTION.value[0]]
    rows += decode.run_engine(_BASELINE.value, 'baseline', old, configs, **settings)
  rows = decode.summarize(rows)
  table = decode.markdown(rows)
  print(table)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(dict(settings, rows=rows), f, indent=1)
    with open(os.path.splitext(_OUT.value)[0] + '.md', 'w') as f:
      f.write(table)


if __name__ == '__main__':
  app.run(main)
