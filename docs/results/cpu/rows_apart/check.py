r"""Whether a pass of 3 rows computed apart gives the bits of three 1-row passes (with
rows_apart.diff applied; random SmolLM2-135M-shaped weights, a 197-token context).

  git apply docs/results/cpu/rows_apart/rows_apart.diff
  python docs/results/cpu/rows_apart/check.py            # float32
  python docs/results/cpu/rows_apart/check.py bf16
"""
import sys
import numpy as np, jax, jax.numpy as jnp
from clasp_jax import attention, engine, model as M
from clasp_jax.configs import models
from clasp_jax.cache import KVCache
dt = jnp.bfloat16 if sys.argv[1:] == ['bf16'] else jnp.float32
config = models.PRESETS['smollm2-135m']()
params = M.unstack_layers(M.init_params(config, jax.random.key(0), dt))
z = jnp.zeros((config.num_layers, 1, 2048, config.num_kv_heads, config.head_dim), dt)
empty = KVCache(k_LBSKh=z, v_LBSKh=z, length=jnp.int32(0))
prompt = jnp.array(np.random.RandomState(0).randint(0, config.vocab_size, (200,)), jnp.int32)
fp = jax.jit(lambda p, t, c: engine.full_pass(p, config, t, c, width=1,
                                              attention=attention.cache_attention)[:3])
c0 = jax.jit(lambda p, t, c: M.forward(p, config, t, c).cache)(params, prompt[None, :197], empty)
T = 3
l3, h3, c3 = fp(params, prompt[197:197 + T], c0)  # one pass, rows apart
c, l1s, h1s = c0, [], []
for r in range(T):  # three 1-row passes
  l1, h1, c = fp(params, prompt[197 + r:198 + r], c)
  l1s.append(l1[0]); h1s.append(h1[:, 0])
f32 = lambda x: np.asarray(x.astype(jnp.float32))
print(dt.__name__, 'logits', [bool(np.array_equal(f32(l3[r]), f32(l1s[r]))) for r in range(T)],
      'hidden states', [bool(np.array_equal(f32(h3[:, r]), f32(h1s[r]))) for r in range(T)],
      'cache', bool(np.array_equal(f32(c3.k_LBSKh), f32(c.k_LBSKh))))
