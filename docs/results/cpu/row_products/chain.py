"""1-row products of SmolLM2-135M's four layer shapes, each as one product and as products
over the halves (and quarters) of K summed, in a chain of 60 distinct weights (each product's
input is the last one's output, as in a decode step), float32, with the library's CPU options.

  python docs/results/cpu/row_products/chain.py     # chain.txt

Prints microseconds a product, the median of 21 calls after a first, and the rate at which the
weights were read. Splits listed twice were timed twice, first and last, to show the drift.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax import xla_options

SHAPES = {'q/k/v': (576, 960), 'o': (576, 576), 'gate/up': (576, 3072), 'down': (1536, 576)}
CHAIN = 60


def median_ms(fn, calls=21):
  fn()
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def product(h_MK, w_KN, split):
  """h @ W as `split` products over consecutive parts of K, summed."""
  if split == 1:
    return h_MK @ w_KN
  M, K = h_MK.shape
  h_SMk = h_MK.reshape(M, split, K // split).transpose(1, 0, 2)
  return jnp.einsum('smk,skn->smn', h_SMk, w_KN.reshape(split, K // split, -1)).sum(0)


rng = np.random.default_rng(0)
for name, (K, N) in SHAPES.items():
  ws = [jnp.asarray(rng.standard_normal((K, N), dtype=np.float32) * 0.03) for _ in range(CHAIN)]
  x_1K = jnp.ones((1, K), jnp.float32)
  for split in (1, 2, 4, 1):

    def chain(x_1K, ws, split=split):
      h_1K = x_1K
      for w_KN in ws:  # the output, tiled or cut to K columns, is the next input
        y_1N = product(h_1K, w_KN, split)
        h_1K = jnp.tile(y_1N, (1, -(-K // N)))[:, :K]
      return h_1K

    run = jax.jit(chain, compiler_options=xla_options.CPU_PER_LAYER_OPTIONS)
    ms = median_ms(lambda: jax.block_until_ready(run(x_1K, ws)))
    print(f'{name:8s} [{K}, {N}] in {split} part(s): {ms / CHAIN * 1e3:6.1f} us a product, '
          f'{K * N * 4 * CHAIN / ms / 1e6:5.1f} GB/s', flush=True)
