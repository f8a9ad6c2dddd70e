r"""A full pass's time at width 1 with rows apart (1, 2 and 3 tokens) and at width 3 (the CPU's
default: every pass 3 rows), with rows_apart.diff applied: the embedded SmolLM2-135M-Instruct,
float32, per-layer buffers, 500 tokens in the cache, the engine's compiler options; the median
of 21 calls of each, the passes in turns.

  git apply docs/results/cpu/rows_apart/rows_apart.diff
  python docs/results/cpu/rows_apart/passes.py
"""
import os, platform, time
import numpy as np, jax, jax.numpy as jnp
import clasp_jax
from clasp_jax import attention, engine, model as M, xla_options
from clasp_jax.cache import KVCache
model = clasp_jax.load()
config, params = model.config, M.unstack_layers(model.params)
z = jnp.zeros((config.num_layers, 1, 2048, config.num_kv_heads, config.head_dim), jnp.float32)
empty = KVCache(k_LBSKh=z, v_LBSKh=z, length=jnp.int32(0))
tokens = jnp.array(np.random.RandomState(0).randint(0, config.vocab_size, (503,)), jnp.int32)
cache = jax.jit(lambda p, t, c: M.forward(p, config, t, c).cache)(params, tokens[None, :500], empty)
def pass_fn(width):
  return jax.jit(lambda p, t, c: engine.full_pass(p, config, t, c, width=width, logits=False,
                                                  attention=attention.cache_attention)[1],
                 compiler_options=xla_options.compiler_options())
cases = {f'width {w}, {T} token{"s" * (T > 1)}': (pass_fn(w), tokens[500:500 + T])
         for w, T in ((1, 1), (1, 2), (1, 3), (3, 1), (3, 3))}
for f, t in cases.values():
  f(params, t, cache).block_until_ready()
times = {k: [] for k in cases}
for _ in range(21):
  for k, (f, t) in cases.items():
    start = time.perf_counter(); f(params, t, cache).block_until_ready()
    times[k].append(time.perf_counter() - start)
cpu = next((l.split(':')[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')),
           platform.processor())
print(f'{cpu}, {len(os.sched_getaffinity(0))} CPUs, jax {jax.__version__}')
for k, v in times.items():
  print(f'{k:22s} {1e3 * np.median(v):6.1f} ms')
