"""EXPERIMENT: where a one-off clasp-generate's 'decoding' seconds go (host phases timed).

Usage: python cli_phases.py <model> <cache folder> [clasp-generate flags, e.g. --method=vanilla]
"""
import collections, functools, json, sys, time
import jax
from clasp_jax import engine
from clasp_jax.cli import generate
phases = collections.defaultdict(float)
def wrap(obj, name, sync=False):
  f = getattr(obj, name)
  @functools.wraps(f)
  def g(*a, **k):
    t = time.perf_counter(); out = f(*a, **k)
    if sync: jax.block_until_ready(out)
    phases[name] += time.perf_counter() - t; return out
  setattr(obj, name, g)
for n in ('start', 'run_segment', '_read', '_stream', '_committed', '_truncate'):
  wrap(engine.Decoder, n, sync=n == 'start')
wrap(jax, 'device_get')
orig_generate = engine.Decoder.generate
def gen(self, *a, **k):
  t = time.perf_counter(); g = orig_generate(self, *a, **k)
  phases['generate_total'] = time.perf_counter() - t; phases['compile'] = g.compile_seconds; return g
engine.Decoder.generate = gen
sys.argv = ['clasp-generate', '--model=' + sys.argv[1], '--cache_dir=' + sys.argv[2], '--prompt=Write a detailed essay about the history of the printing press.', '--chat', '--max_new_tokens=256'] + sys.argv[3:]
try:
  generate.run()
except SystemExit:
  pass
print('PHASES', json.dumps({k: round(v * 1e3, 2) for k, v in phases.items()}), flush=True)
