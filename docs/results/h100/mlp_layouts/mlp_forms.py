"""Whether XLA fuses SiLU(gate) * up into a neighbour for other layouts of the gate/up weight.

A chain of L MLP blocks (norm, gate/up, SiLU(gate) * up, down, residual) at 16 rows, bf16,
one jitted program; per form the GPU kernels per layer and their busy us, and the wall time.
Rows to $OUT/mlp.jsonl (per kernel: us and calls a layer).

  OUT=<folder> python mlp_forms.py
"""
import collections, json, os, sys, time
import numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '../../h200/decode/attention_fold'))
from gpu_trace import kernel_events

OUT = os.environ.get('OUT', '/tmp')
T = 16


def rms_norm(x, w):
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-5)
  return w * x32.astype(x.dtype)


def act_A(h, w):  # [D, 2F]: the library's layout (n = 1)
  g, u = jnp.split(h @ w, 2, axis=-1)
  return jax.nn.silu(g) * u


def act_B(h, w):  # [D, 2, F]
  o = jnp.einsum('td,dcf->tcf', h, w)
  return jax.nn.silu(o[:, 0]) * o[:, 1]


def act_C(h, w):  # [D, F, 2]
  o = jnp.einsum('td,dfc->tfc', h, w)
  return jax.nn.silu(o[..., 0]) * o[..., 1]


def act_D(h, w):  # (gate, up) apart
  return jax.nn.silu(h @ w[0]) * (h @ w[1])


FORMS = dict(A=(act_A, lambda D, F: (D, 2 * F)), B=(act_B, lambda D, F: (D, 2, F)),
             C=(act_C, lambda D, F: (D, F, 2)), D=(act_D, lambda D, F: (2, D, F)))


SHAPES = dict(smollm2=(30, 576, 1536), l8b=(32, 4096, 14336))
if jax.default_backend() != 'gpu':
  SHAPES = dict(tiny=(2, 64, 128))
for shape, (L, D, F) in SHAPES.items():
  key = jax.random.key(0)
  x = jax.random.normal(key, (T, D), jnp.bfloat16)
  for form, (act, wshape) in FORMS.items():
    ws = [(jnp.ones((D,), jnp.bfloat16),
           (0.02 * jax.random.normal(jax.random.key(3 * l + 1), wshape(D, F))).astype(jnp.bfloat16),
           (0.02 * jax.random.normal(jax.random.key(3 * l + 2), (F, D))).astype(jnp.bfloat16))
          for l in range(L)]

    @jax.jit
    def chain(x, ws, act=act):
      for norm_w, w_gu, w_down in ws:
        x = x + act(rms_norm(x, norm_w), w_gu) @ w_down
      return x

    jax.block_until_ready(chain(x, ws))
    walls = []
    for _ in range(9):
      t = time.perf_counter(); jax.block_until_ready(chain(x, ws)); walls.append(time.perf_counter() - t)
    agg, count = collections.defaultdict(float), collections.defaultdict(float)
    for name, dur in kernel_events(chain, (x, ws), 3):
      agg[name] += dur / 3
      count[name] += 1 / 3
    per_layer = {k: (round(agg[k] / L, 2), round(count[k] / L, 2)) for k in sorted(agg, key=lambda k: -agg[k])}
    row = dict(shape=shape, form=form, wall_us_layer=round(1e6 * float(np.median(walls)) / L, 2),
               busy_us_layer=round(sum(agg.values()) / L, 2),
               kernels_per_layer=round(sum(count.values()) / L, 2), kernels=per_layer)
    print(json.dumps(row), flush=True)
    with open(f'{OUT}/mlp.jsonl', 'a') as f:
      f.write(json.dumps(row) + '\n')
    del ws
