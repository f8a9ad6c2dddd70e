"""EXPERIMENT: where a new process's first plain generation spends its extra time.

Usage: OUT=<folder> python first_runs.py <model> <cache folder> <tag>; the tag zero_first runs
the plain segment's program once with no rounds before its first timed run.
"""
import json, os, sys, time
import jax
import numpy as np
from clasp_jax import weights
from clasp_jax.engine import enable_compilation_cache
from clasp_jax.generation import make_decoder, encode_prompt
from clasp_jax.strategies.base import Segment
enable_compilation_cache(sys.argv[2])
m = weights.load(sys.argv[1] or None, cache_dir=sys.argv[2])
ids = encode_prompt(m, 'Write a detailed essay about the history of the printing press.', chat=True)
d = make_decoder(m, 'vanilla')
row = dict(tag=sys.argv[3], compile_s=round(d.compile(len(ids), 256), 3))
def timed(name, fn):
  t = time.perf_counter(); out = jax.block_until_ready(fn()); row[name] = round((time.perf_counter() - t) * 1e3, 2); return out
for k in range(2):
  s = timed(f'prefill{k}_ms', lambda: d.start(ids, 256))
  if k == 0 and sys.argv[3] == 'zero_first':
    s, r = timed('zero_rounds_ms', lambda: d._segments['plain'](*d._segment_args(s, Segment(draft=False), 256)[:3], np.int32(0), np.int32(0)))
  s, r = timed(f'segment{k}_ms', lambda: d.run_segment(s, Segment(draft=False), 256))
for k in range(3):
  g = d.generate(ids, 256)
  row[f'gen{k}_ms'] = round(g.decode_seconds * 1e3, 2)
print(json.dumps(row), flush=True)
with open(os.environ['OUT'] + '/firstgen2.jsonl', 'a') as f:
  f.write(json.dumps(row) + '\n')
