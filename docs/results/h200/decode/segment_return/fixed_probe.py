"""The fixed cost of a segment: segments of 0, 1 and 3 drafting rounds (CLaSp's program,
M = L/2, K = 8, DET 0, refresh_every 0; static's too), host times of the call and the read."""
import sys, time, json, os
import jax, numpy as np
from clasp_jax.bench import decode
from clasp_jax.configs import models
from clasp_jax.engine import Decoder
from clasp_jax.strategies.base import Segment
preset = sys.argv[1]
config = models.PRESETS[preset]()
if os.environ.get('TINY'):
  import dataclasses
  config = dataclasses.replace(config, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=256)
params = decode.random_params(config, jax.random.key(0), 'bfloat16')
L = config.num_layers
set_a = np.zeros(L, bool); set_a[1::2] = True
prompt = np.random.RandomState(0).randint(0, config.vocab_size, 800).tolist()
budget = 1200
out = {}
for what in ('refresh', 'draft'):
  dec = Decoder(params, config, decode.case_strategy(what, config))
  for rounds in (0, 1, 3, 0, 1, 3):
    seg = Segment(draft=True, rounds=rounds, refresh_every=0)
    state = dec.put_skip_set(dec.start(prompt, budget), set_a)
    calls, reads = [], []
    for i in range(24):
      b = time.perf_counter()
      state, report = dec.run_segment(state, seg, budget)
      c = time.perf_counter()
      report = jax.device_get(report)
      d = time.perf_counter()
      calls.append(c - b); reads.append(d - c)
    out[(what, rounds)] = (1e3 * np.median(calls[4:]), 1e3 * np.median(reads[4:]))
for (what, rounds), (c, r) in sorted(out.items()):
  print(f'{preset} {what:8s} rounds={rounds} call_ms={c:.3f} read_ms={r:.3f}')
