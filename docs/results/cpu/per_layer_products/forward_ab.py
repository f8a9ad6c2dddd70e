"""One 9-row pass of the embedded SmolLM2 (float32) after 53 cached tokens, `model.forward`
jitted alone with the CPU's compiler options: the stacked layers (the CPU's default) against
per-layer buffers (`model.unstack_layers`, projections fused; and unfused), in turns; then a
profiler trace of one per-layer pass, read for the time between XLA's ops.

    python docs/results/cpu/per_layer_products/forward_ab.py      # forward_ab.txt

With `xla_cpu_multi_thread_eigen` off in the traced program, so that no product's work is
left to Eigen's pool. A gap is time in which no op of the program was running; it is
charged to the op before it.
"""
import collections
import functools
import glob
import os
import re
import statistics
import tempfile
import time

import jax
from jax._src.lib import _profile_data  # pylint: disable=g-direct-tensorflow-import
import jax.numpy as jnp
import numpy as np

import clasp_jax
from clasp_jax import model as model_lib
from clasp_jax import xla_options
from clasp_jax.cache import init_cache

REPS = 12
model = clasp_jax.load()
config = model.config
layouts = {
    'stacked': model.params,
    'per_layer': model_lib.unstack_layers(model.params),
    'per_layer_unfused': dict(model.params, layers=tuple(
        model_lib.layer_params(model.params, i) for i in range(config.num_layers))),
}
tokens_1T = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (1, 9)), jnp.int32)


def pass_fn(options):
  @functools.partial(jax.jit, compiler_options=options, donate_argnums=(1,))
  def run(params, cache):
    out = model_lib.forward(params, config, tokens_1T, cache,
                            out_idx_BP=jnp.zeros((1, 1), jnp.int32))
    return out.logits_BPV, out.cache.rollback(cache.length)
  return run


def cache_after(n):
  return init_cache(config, 1024, dtype=jnp.float32).rollback(jnp.int32(n))


run = pass_fn(xla_options.compiler_options())
caches = {name: cache_after(53) for name in layouts}
logits = {}
for name, params in layouts.items():
  logits[name], caches[name] = run(params, caches[name])
times = {name: [] for name in layouts}
for rep in range(REPS):
  for name, params in layouts.items():
    start = time.perf_counter()
    out, caches[name] = run(params, caches[name])
    out.block_until_ready()
    times[name].append((time.perf_counter() - start) * 1e3)
for name in layouts:
  print(f'{name:18s} {statistics.median(times[name]):6.1f} ms a pass (median of {REPS})  '
        f'logits equal to stacked: {bool(jnp.array_equal(logits[name], logits["stacked"]))}')

single = pass_fn(dict(xla_options.compiler_options(), xla_cpu_multi_thread_eigen=False))
for name in ('stacked', 'per_layer'):
  cache = cache_after(53)
  for _ in range(3):
    out, cache = single(layouts[name], cache)
  out.block_until_ready()
  folder = tempfile.mkdtemp()
  with jax.profiler.trace(folder):
    out, cache = single(layouts[name], cache)
    out.block_until_ready()
  trace = glob.glob(os.path.join(folder, '**', '*.xplane.pb'), recursive=True)[0]
  ops = sorted((e.start_ns, e.end_ns, re.sub(r'\.\d+$', '', e.name))
               for plane in _profile_data.ProfileData.from_file(trace).planes
               for line in plane.lines if not line.name.startswith('python')
               for e in line.events
               if not (e.name.startswith(('end:', 'while')) or 'ThreadpoolListener' in e.name
                       or 'ThunkExecutor' in e.name))
  busy, gaps, end = collections.Counter(), collections.Counter(), ops[0][1]
  for (_, _, before), (start, stop, kind) in zip(ops, ops[1:]):
    if start > end:
      gaps[before] += (start - end) / 1e6
    end = max(end, stop)
  for start, stop, kind in ops:
    busy[kind] += (stop - start) / 1e6
  span = (max(e[1] for e in ops) - ops[0][0]) / 1e6
  print(f'\n{name}, traced, Eigen single-threaded: {span:.1f} ms from the first op to the last; '
        f'ops {sum(busy.values()):.1f} ms, gaps {sum(gaps.values()):.1f} ms')
  for kind, ms in busy.most_common(4):
    print(f'   ops  {ms:6.2f} ms  {kind}')
  for kind, ms in gaps.most_common(3):
    print(f'   gaps {ms:6.2f} ms  after {kind}')
