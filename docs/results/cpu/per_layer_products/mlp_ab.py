"""A micro-benchmark: 30 SmolLM2-sized MLP layers on 9 rows (x + (tanh(x W)[:F] * (x W)[F:]) D,
W [576, 3072], D [1536, 576], random float32), jitted with the CPU's compiler options, in
turns: the weights stacked and sliced in a `lax.scan` (the CPU's default layout), per-layer
buffers in an unrolled loop, and the stacked scan with each next layer's slices carried
(double-buffered, two layers a trip). Also the time to read every weight of the embedded
SmolLM2 once (a sum), stacked and per layer: this machine's memory bandwidth as XLA reaches it.

    python docs/results/cpu/per_layer_products/mlp_ab.py      # mlp_ab.txt
"""
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import clasp_jax
from clasp_jax import model as model_lib
from clasp_jax import xla_options

L, D, F = 30, 576, 1536
ROWS, REPS = 9, 15
jit = functools.partial(jax.jit, compiler_options=xla_options.compiler_options())
rng = np.random.default_rng(0)
w_LDF = jnp.asarray(rng.standard_normal((L, D, 2 * F), np.float32) * 0.02)
d_LFD = jnp.asarray(rng.standard_normal((L, F, D), np.float32) * 0.02)
w_per_layer = [w_LDF[i] + 0 for i in range(L)]
d_per_layer = [d_LFD[i] + 0 for i in range(L)]


def mlp(x_MD, w_DF, d_FD):
  h_MF = x_MD @ w_DF
  return x_MD + (jnp.tanh(h_MF[:, :F]) * h_MF[:, F:]) @ d_FD


@jit
def stacked(x_MD):
  return jax.lax.scan(lambda x, wd: (mlp(x, *wd), None), x_MD, (w_LDF, d_LFD))[0]


@jit
def per_layer(x_MD):
  for w_DF, d_FD in zip(w_per_layer, d_per_layer):
    x_MD = mlp(x_MD, w_DF, d_FD)
  return x_MD


@jit
def carried(x_MD):
  def take(i):
    return (jax.lax.dynamic_index_in_dim(w_LDF, i, keepdims=False),
            jax.lax.dynamic_index_in_dim(d_LFD, i, keepdims=False))

  def two_layers(carry, j):
    x_MD, this = carry
    after = take(2 * j + 1)  # the next layer's slices, independent of x
    x_MD = mlp(x_MD, *this)
    this = take(jnp.minimum(2 * j + 2, L - 1))
    return (mlp(x_MD, *after), this), None
  return jax.lax.scan(two_layers, (x_MD, take(0)), jnp.arange(L // 2))[0][0]


def median_ms(fns, *args):
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(REPS):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append((time.perf_counter() - start) * 1e3)
  return {name: round(statistics.median(t), 1) for name, t in times.items()}


x_MD = jnp.full((ROWS, D), 0.1, jnp.float32)
fns = {'stacked': stacked, 'per_layer': per_layer, 'carried': carried}
print(f'30 MLP layers, {ROWS} rows, ms (median of {REPS}):', median_ms(fns, x_MD))
print('  same values:', [bool(jnp.array_equal(stacked(x_MD), fn(x_MD))) for fn in fns.values()])

model = clasp_jax.load()
layouts = {'stacked': model.params, 'per_layer': model_lib.unstack_layers(model.params)}
read_all = jit(lambda params: sum(jnp.sum(w) for w in jax.tree.leaves(params)))
nbytes = sum(w.nbytes for w in jax.tree.leaves(model.params))
for name, ms in median_ms({k: functools.partial(read_all, p) for k, p in layouts.items()}).items():
  print(f'reading SmolLM2\'s {nbytes / 1e6:.0f} MB of weights once, {name}: {ms} ms '
        f'({nbytes / ms / 1e6:.1f} GB/s)')
