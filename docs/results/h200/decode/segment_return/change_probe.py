"""What a skip-set change costs around a segment: segments of 3 drafting rounds (M = L/2,
K = 8, DET 0, CLaSp's program with the DP in the verify passes, refresh_every 0), the same
skip set every segment against two sets in turn; host times of each piece."""
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
dec = Decoder(params, config, decode.case_strategy('refresh', config))
static = Decoder(params, config, decode.case_strategy('draft', config))
L = config.num_layers
set_a = np.zeros(L, bool); set_a[1::2] = True
set_b = set_a.copy(); set_b[[1, 2]] = [False, True]; set_b[[L - 3, L - 2]] = [False, True]
assert set_a.sum() == set_b.sum()
prompt = np.random.RandomState(0).randint(0, config.vocab_size, 800).tolist()
seg = Segment(draft=True, rounds=3, refresh_every=0)
budget = 1200
def run(alternate, n=24, dec=dec):
  state = dec.start(prompt, budget)
  state = dec.put_skip_set(state, set_a)
  t_put = t_call = t_read = 0.0
  jax.block_until_ready(state)
  start = time.perf_counter()
  for i in range(n):
    a = time.perf_counter()
    if alternate:
      state = dec.put_skip_set(state, set_b if i % 2 else set_a)
    b = time.perf_counter()
    state, report = dec.run_segment(state, seg, budget)
    c = time.perf_counter()
    report = jax.device_get(report)
    d = time.perf_counter()
    t_put += b - a; t_call += c - b; t_read += d - c
  total = time.perf_counter() - start
  rounds = int(report.num_rounds)
  return dict(alternate=alternate, segments=n, rounds=rounds, ms_per_segment=1e3 * total / n,
              put_ms=1e3 * t_put / n, call_ms=1e3 * t_call / n, read_ms=1e3 * t_read / n)
for _ in range(2):
  run(False, 4); run(True, 4); run(False, 4, static)
rows = []
for rep in range(4):
  for alt in (False, True, 'static'):
    r = run(alt is True, dec=static if alt == 'static' else dec); r['case'] = str(alt); r['rep'] = rep
    rows.append(r); print(json.dumps(r), flush=True)
for alt in ('False', 'True', 'static'):
  for k in ('ms_per_segment', 'put_ms', 'call_ms', 'read_ms'):
    ms = sorted(r[k] for r in rows if r['case'] == alt)
    print(preset, {'False': 'same', 'True': 'alternate', 'static': 'static 3-round'}[alt], k, 'median %.3f' % ms[len(ms) // 2])
