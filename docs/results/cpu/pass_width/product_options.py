"""Can any product kernel at hand multiply 9 rows at the memory's pace on this CPU? x [M, 576]
@ W on one SmolLM2-135M-sized matrix (283 MB, float32), M = 1, 9 and 16, the median of 7 calls
after a first: XLA with the library's CPU options, with each of XLA's other CPU dot libraries
(oneDNN, XNNPACK, YNNPACK), with the weight stored transposed ([N, K], the product written as
W x^T), and torch's `matmul` (MKL or oneDNN).

  python docs/results/cpu/pass_width/product_options.py     # product_options.txt
"""
import time
import jax
import jax.numpy as jnp
import numpy as np
import torch
from clasp_jax import xla_options

K, N = 576, 3072 * 40
DOT = 'LIBRARY_FUSION_TYPE_DOT'
OPTIONS = {
    'XLA, the library options': {},
    'XLA, oneDNN dots': {'xla_cpu_experimental_onednn_fusion_type': DOT},
    'XLA, XNNPACK dots': {'xla_cpu_experimental_xnn_fusion_type': DOT},
    'XLA, YNNPACK dots': {'xla_cpu_experimental_ynn_fusion_type': DOT},
}
NT = (((1,), (1,)), ((), ()))


def median_ms(fn):
  fn()
  times = []
  for _ in range(7):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


w_KN = jnp.ones((K, N), jnp.float32)
w_NK = jnp.ones((N, K), jnp.float32)
w_torch = torch.ones(K, N)
sums = jax.jit(jnp.sum)
big = jnp.ones((1 << 27,), jnp.float32)
print(f'a sum over 537 MB: {big.nbytes / median_ms(lambda: sums(big).block_until_ready()) / 1e6:.1f} GB/s')
for M in (1, 9, 16):
  x_MK = jnp.ones((M, K), jnp.float32)
  row = {}
  for name, extra in OPTIONS.items():
    product = jax.jit(lambda x, w: x @ w,
                      compiler_options={**xla_options.CPU_COMPILER_OPTIONS, **extra})
    row[name] = median_ms(lambda: product(x_MK, w_KN).block_until_ready())
  transposed = jax.jit(lambda x, w: jax.lax.dot_general(w, x, NT),
                       compiler_options=xla_options.CPU_COMPILER_OPTIONS)
  row['XLA, weight stored [N, K]'] = median_ms(lambda: transposed(x_MK, w_NK).block_until_ready())
  x_torch = torch.ones(M, K)
  row[f'torch {torch.__version__} matmul'] = median_ms(lambda: x_torch @ w_torch)
  for name, ms in row.items():
    print(f'M = {M:2d}  {name:28s} {ms:5.1f} ms  ({w_KN.nbytes / ms / 1e6:4.1f} GB/s of weights)',
          flush=True)
