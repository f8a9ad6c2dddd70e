"""The attention of a long prompt's prefill alone, with the reductions over a block's keys as
they are (`attention._reduce_keys`) and as one `op(x, axis=-1)` each, side by side.

  python docs/results/cpu/cache_attention/prefill_attention.py   # printed lines: prefill_attention.txt

SmolLM2-135M's attention shapes (30 layers, 9 query heads over 3 KV heads of 64, float32, a
2048-position cache of random values) over the passes a 769-token prompt's prefill runs on a
CPU (three of 256 rows, one of 64: `engine._prefill`), each layer's queries depending on the
last layer's output. Each variant is a program of its own, compiled with the per-layer CPU
options; milliseconds per prefill, the median of 3 calls, in turns, twice.
"""
import functools, time
import jax, jax.numpy as jnp, numpy as np
from clasp_jax import attention, xla_options

L, S, KV, G, HD = 30, 2048, 3, 3, 64
PASSES = [(0, 256), (256, 256), (512, 256), (768, 64)]  # (start, rows)
keys = iter(jax.random.split(jax.random.key(0), 2 + 3 * len(PASSES)))
cache_k, cache_v = (jax.random.normal(next(keys), (L, 1, S, KV, HD)) for _ in range(2))
chunks = [tuple(jax.random.normal(next(keys), (1, T, n, HD)) for n in (KV * G, KV, KV))
          for _, T in PASSES]


def prefill(cache_k, cache_v, chunks):  # traced anew by each `compiled`, below
  outs = []
  for (start, T), (q, k, v) in zip(PASSES, chunks):
    x = jnp.zeros((1, T, KV * G * HD))
    for layer in range(L):
      x = attention.cache_attention(q + 1e-30 * x.reshape(q.shape), k, v, cache_k, cache_v,
                                    layer, jnp.int32(start))
    outs.append(x)
  return outs


def compiled(reduce_keys):
  attention._reduce_keys = reduce_keys  # read while tracing, below
  fn = jax.jit(lambda *args: prefill(*args), compiler_options=xla_options.CPU_PER_LAYER_OPTIONS)
  fn = fn.lower(cache_k, cache_v, chunks).compile()
  return fn


grouped = attention._reduce_keys
runs = {'one reduction': compiled(lambda op, x: op(x, axis=-1)), 'grouped (now)': compiled(grouped)}
attention._reduce_keys = grouped
outs = {k: fn(cache_k, cache_v, chunks) for k, fn in runs.items()}
diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(*outs.values()))
print(f'largest difference between the two outputs: {diff:.3g}')
for turn in range(2):
  for k, fn in runs.items():
    times = []
    for _ in range(3):
      t = time.perf_counter(); jax.block_until_ready(fn(cache_k, cache_v, chunks))
      times.append(time.perf_counter() - t)
    print(f'turn {turn}: {k:14s} {1000 * np.median(times):5.0f} ms', flush=True)
