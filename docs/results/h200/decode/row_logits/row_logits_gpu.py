"""On a GPU: plain decoding and a static drafting round with each token's logits a row at a
time (`Decoder(logits_by_row=True)`, the CPU's default) against the pass's own 16-row logits
(False, the accelerators' default), in turns in one process.

  python docs/results/h200/decode/row_logits/row_logits_gpu.py  # prints a table, writes $OUT

Random bf16 weights of each preset (`clasp_jax.bench.decode`'s), a prompt of 1024 - 160
random tokens; per token (plain) or per round (static, M = L/2, K = 8, DET 0: random weights
reject nearly every draft, so a by-row verify computes about one row of the head) from the
difference of 160- and 32-token generations, median of 5 turns."""
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax.bench import decode
from clasp_jax.configs import models
from clasp_jax.engine import Decoder

rows = []
for preset in os.environ.get('PRESETS', 'smollm2-135m,llama3-8b').split(','):
  config = models.PRESETS[preset]()
  params = decode.random_params(config, jax.random.key(0), jnp.bfloat16)
  prompt = np.random.RandomState(0).randint(0, config.vocab_size, 1024 - 160).tolist()
  runs = {}
  for what in ('plain', 'draft'):
    for by_row in (False, True):
      d = Decoder(params, config, decode.case_strategy(what, config), logits_by_row=by_row)
      d.generate(prompt, 32), d.generate(prompt, 160)
      runs[(what, by_row)] = d
  times = {k: [] for k in runs}
  for _ in range(5):
    for k, d in runs.items():
      outs = []
      for n in (32, 160):
        start = time.perf_counter()
        out = d.generate(prompt, n)
        outs.append((time.perf_counter() - start, len(out.accept_lengths)))
      (t0, r0), (t1, r1) = outs
      times[k].append((t1 - t0) / (r1 - r0))
  for (what, by_row), ts in times.items():
    rows.append(dict(preset=preset, what=what, logits_by_row=by_row,
                     ms_per_round=1e3 * statistics.median(ts), runs_ms=[1e3 * t for t in ts]))
    print(f'{preset:14s} {what:6s} logits_by_row={by_row!s:5s} '
          f'{rows[-1]["ms_per_round"]:8.3f} ms/round', flush=True)
  del params, runs
with open(os.environ.get('OUT', 'row_logits_gpu.json'), 'w') as f:
  json.dump(dict(jax=jax.__version__, device=jax.devices()[0].device_kind, rows=rows), f,
            indent=1)
