"""What a weight product costs by the rows it multiplies, on this CPU (float32, the CPU's
compiler options): one SmolLM2-135M-sized matrix [576, 40 x 3072] (283 MB, about two thirds of
the model's layer weights), x [M, 576] @ W, the median of 7 calls after a first.

  python docs/results/cpu/pass_width/product_rows.py     # product_rows.txt
"""
import time
import jax
import jax.numpy as jnp
from clasp_jax import xla_options

K, N = 576, 3072 * 40
w_KN = jnp.ones((K, N), jnp.float32)
product = jax.jit(lambda x_MK, w_KN: x_MK @ w_KN, compiler_options=xla_options.CPU_COMPILER_OPTIONS)
x_1N = jnp.ones((1 << 27,), jnp.float32)  # 537 MB: what one streaming read takes
total = jax.jit(jnp.sum)
total(x_1N).block_until_ready()
times = []
for _ in range(7):
  t = time.perf_counter(); total(x_1N).block_until_ready(); times.append(time.perf_counter() - t)
print(f'a sum over 537 MB: {x_1N.nbytes / sorted(times)[3] / 1e9:.1f} GB/s')
for M in (1, 2, 3, 4, 6, 8, 9, 12, 16):
  x_MK = jnp.ones((M, K), jnp.float32)
  product(x_MK, w_KN).block_until_ready()
  times = []
  for _ in range(7):
    t = time.perf_counter()
    product(x_MK, w_KN).block_until_ready()
    times.append(time.perf_counter() - t)
  t = sorted(times)[3]
  print(f'M = {M:2d}: {t * 1e3:5.1f} ms, the weights at {w_KN.nbytes / t / 1e9:4.1f} GB/s')
