r"""One call of the CPU attention kernel (`cpu_attention.row_attention`, one layer of the
SmolLM2-135M shape: 9 query heads, 3 KV heads of 64, a 2048-position float32 cache of random
values) for 1 and 3 rows after 400, 800 and 1500 cached positions: the 10th percentile of 300
timed calls each, in microseconds, printed on one line after the label given.

  PYTHONPATH=<checkout> python docs/results/cpu/attention_kernel_loops/kernel_call.py <label>
  ... kernel_call.py <label> 32,8,128     # another shape: query heads, KV heads, head size

(Each checkout builds its own kernel library: the library's key hashes its sources.)
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax import cpu_attention

rng = np.random.default_rng(0)
H, KV, hd = map(int, sys.argv[2].split(',')) if len(sys.argv) > 2 else (9, 3, 64)
S = 2048
cache_k = jnp.asarray(rng.standard_normal((1, 1, S, KV, hd)), jnp.float32)
cache_v = jnp.asarray(rng.standard_normal((1, 1, S, KV, hd)), jnp.float32)
cells = []
for start in (400, 800, 1500):
  for rows in (1, 3):
    q = jnp.asarray(rng.standard_normal((1, rows, H, hd)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, rows, KV, hd)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, rows, KV, hd)), jnp.float32)
    call = jax.jit(lambda q, k, v, s: cpu_attention.row_attention(q, k, v, cache_k, cache_v, 0, s))
    s = jnp.int32(start)
    jax.block_until_ready(call(q, k, v, s))
    seconds = []
    for _ in range(300):
      t = time.perf_counter()
      jax.block_until_ready(call(q, k, v, s))
      seconds.append(time.perf_counter() - t)
    cells.append(f'{start}/{rows}: {np.percentile(seconds, 10) * 1e6:7.1f}')
print(sys.argv[1], '  '.join(cells), flush=True)
