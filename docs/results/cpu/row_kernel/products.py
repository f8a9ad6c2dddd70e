r"""SmolLM2-135M's layer products alone (30 layers of q, k, v, o, gate, up and down, unfused,
random float32 weights), one after another in one jitted program, for 1 and 3 rows: XLA's
products against the CPU product kernel's, and whether the kernel's rows equal XLA's 1-row
products bit for bit.

  python docs/results/cpu/row_kernel/products.py      # from the repository root

Least and median of 20 calls. Shows the products' cost without the rest of a pass.
"""
import os, platform, time
import numpy as np
import jax
import jax.numpy as jnp
from clasp_jax import cpu_product

SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
rng = np.random.default_rng(0)
weights = [jnp.asarray(rng.standard_normal(s) * 0.02, jnp.float32) for s in SHAPES * 30]
cpu = next((l.split(':')[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')),
           platform.processor())
print(f'{cpu}, {len(os.sched_getaffinity(0))} CPUs, jax {jax.__version__}', flush=True)


def chain(x_RD, weights, product):
  total = 0.0
  for w_KN in weights:  # each product's input is x, widened to K by repeating it
    x_RK = jnp.tile(x_RD, (1, 3))[:, :w_KN.shape[0]]
    total = total + product(x_RK, w_KN)[:, :1].sum()
  return total


print('| rows | products | ms (least) | ms (median) |\n|---:|---|---:|---:|')
for rows in (1, 3):
  x_RD = jnp.asarray(rng.standard_normal((rows, 576)), jnp.float32)
  for name, product in (('XLA', jnp.matmul), ('kernel', cpu_product.kernel_product)):
    f = jax.jit(lambda x, ws, product=product: chain(x, ws, product))
    f(x_RD, weights).block_until_ready()
    times = []
    for _ in range(20):
      start = time.perf_counter(); f(x_RD, weights).block_until_ready()
      times.append(time.perf_counter() - start)
    print(f'| {rows} | {name} | {min(times) * 1e3:.2f} | {np.median(times) * 1e3:.2f} |', flush=True)
x_3D = jnp.asarray(rng.standard_normal((3, 1536)), jnp.float32)
equal = [np.array_equal(np.asarray(jax.jit(cpu_product.kernel_product)(x_3D[:, :K], w)),
                        np.stack([np.asarray(jax.jit(jnp.matmul)(x_3D[r:r + 1, :K], w))[0]
                                  for r in range(3)]))
         for K, w in ((s[0], w) for s, w in zip(SHAPES, weights[:7]))]
print('kernel rows == XLA 1-row products, bit for bit, per shape:', dict(zip(map(str, SHAPES), equal)))
