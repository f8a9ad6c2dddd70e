"""Decode speed through `Decoder.generate` on random weights of preset shapes, against the
weight-bytes roofline; optionally beside an older checkout measured in the same run.

  python scripts/bench_decode.py --presets=smollm2-135m,llama3-8b --contexts=1024,4096 \
      --baseline=/path/to/older/checkout --out=docs/results/h200/decode.json
  python scripts/bench_decode.py --presets=llama3-8b,llama3-70b --mesh=none,tp:2
  python scripts/bench_decode.py --what=prefill --contexts=128,1024,4096 --attention=auto,xla

Writes the rows as JSON and a markdown table beside it (`.md`), rewritten after every row, and
prints the table. See `clasp_jax/bench/decode.py` for what each figure is.
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
_WHATS = ('plain', 'draft', 'refresh', 'prefill')
_WHAT = flags.DEFINE_list('what', ['plain', 'draft', 'refresh'], 'plain: plain decoding; '
                          'draft: static M = L/2, DET 0; refresh: CLaSp M = L/2, LOI 1; '
                          'prefill: the time to the first token from a prompt of each '
                          'context.')
_ATTENTION = flags.DEFINE_list('attention', ['auto'], "The new engine's cache attention: auto, "
                               'xla, pallas (each measured).')
_BASELINE = flags.DEFINE_string('baseline', None, 'An older checkout to measure beside this '
                                'one (the same cases, auto attention).')
_MESH = flags.DEFINE_list('mesh', ['none'], "Where this commit's engine runs, each measured: "
                          'none (one device), tp:N or auto (every device), tensor parallel.')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'Weight dtype.')
_SHORT = flags.DEFINE_integer('short', 32, 'New tokens of the short generation.')
_LONG = flags.DEFINE_integer('long', 160, 'New tokens of the long generation.')
_REPS = flags.DEFINE_integer('reps', 3, 'Timed generations per length (median).')
_INTERLEAVE = flags.DEFINE_bool('interleave', False, "Time each preset's cases in turns, every "
                                'case once per turn, instead of one case after the other: for '
                                'differences between cases (refresh against draft) that are '
                                'small beside the drift of a run.')
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
  unknown = set(_WHAT.value) - set(_WHATS)
  if unknown:
    raise app.UsageError(f'unknown --what {sorted(unknown)}; known: {list(_WHATS)}')
  if _LONG.value <= _SHORT.value:
    raise app.UsageError(f'--long ({_LONG.value}) must exceed --short ({_SHORT.value})')
  configs = {p: dataclasses.asdict(models.PRESETS[p]()) for p in _PRESETS.value}
  cases = [decode.Case(p, int(c), w, a) for p in _PRESETS.value for c in _CONTEXTS.value
           for w in _WHAT.value for a in _ATTENTION.value]
  settings = dict(dtype=_DTYPE.value, short=_SHORT.value, long=_LONG.value, reps=_REPS.value,
                  interleave=_INTERLEAVE.value)
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  rows = []

  def record(row):
    """Keeps each row as it is measured, rewriting --out: a run stopped early (a time limit)
    leaves every row it finished."""
    rows.append(row)
    if _OUT.value:
      _write(_OUT.value, settings, rows)

  for mesh in meshes:  # a worker each: one model in memory at a time
    decode.run_engine(here, 'this commit', cases, configs, mesh=mesh, on_row=record, **settings)
  if _BASELINE.value:
    old = [dataclasses.replace(c, attention='auto') for c in cases
           if c.attention == _ATTENTION.value[0]]
    decode.run_engine(_BASELINE.value, 'baseline', old, configs, on_row=record, **settings)
  print(decode.markdown(decode.summarize(rows)))


def _write(path: str, settings: dict, rows: list[dict]) -> None:
  """The rows so far, summarized, as JSON at `path` and a markdown table beside it."""
  rows = decode.summarize(rows)
  with open(path, 'w') as f:
    json.dump(dict(settings, rows=rows), f, indent=1)
  with open(os.path.splitext(path)[0] + '.md', 'w') as f:
    f.write(decode.markdown(rows))


if __name__ == '__main__':
  app.run(main)
