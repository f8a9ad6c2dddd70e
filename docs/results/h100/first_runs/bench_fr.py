"""`clasp-bench` with `Decoder.compile`'s first runs chosen by the environment's FR:

- lib: the library's (this commit: each newly compiled program once, a segment for one round);
- zero: b71f6c5's (a segment for no round);
- prefill: the prefill's first run alone;
- none: no first runs.

  FR=zero python bench_fr.py --model=<model> --methods=vanilla ...   (clasp-bench's flags)
"""
import os
import jax, numpy as np
from clasp_jax import engine
MODE = os.environ['FR']
_first_run_args = engine._first_run_args

def compile(self, n, m, first_runs=None):
  before = self.compile_seconds
  programs = list(self._programs(n, m))
  for _, function, args in programs:
    function.compiled(*args)
  capacity = self._shapes(n, m)[1]
  self._cache_program(capacity)
  seconds = self.compile_seconds - before
  if seconds and MODE != 'none':
    for name, function, args in programs:
      if MODE == 'prefill' and name != 'prefill':
        continue
      run_args = _first_run_args(name, args, self._new_cache(capacity))
      if MODE == 'zero' and name not in ('prefill', 'refresh'):
        run_args = run_args[:2] + (np.int32(m), np.int32(0)) + run_args[4:]
      jax.block_until_ready(function(*run_args))
  return seconds

if MODE != 'lib':
  engine.Decoder.compile = compile
from clasp_jax.cli import bench
bench.run()
