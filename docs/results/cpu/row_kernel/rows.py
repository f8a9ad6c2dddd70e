r"""Whether each row of a 3-row pass computes what a 1-row pass of its token computes, bit for
bit: random float32 weights of the SmolLM2-135M shape, per-layer buffers, a pass of 3 tokens
after a prompt of P random tokens against three 1-row passes, every layer's hidden states and
the keys and values written.

  python docs/results/cpu/row_kernel/rows.py      # from the repository root; rows.txt

Two settings of the 1-row pass: as the code runs it (XLA's 1-row products, the o and down
products as two half-depth products: `model._closing_product`), and with the kernel for
every product of 1 to 3 rows (`cpu_product.MIN_ROWS` = 1, `_closing_product` replaced by
`cpu_product.product`; patched here, not in the code). The 3-row pass runs the kernel either way.
Shows what a plain step at one row inside a 3-row decoder would need to stay exact; the
attention is `attention.cache_attention` as it is (`_row_attention` for 1 row, the batched
products for 3), so an equality here is observed, not built in.
"""
import numpy as np
import jax
import jax.numpy as jnp
from clasp_jax import cache as cache_lib, cpu_product, model as model_lib
from clasp_jax.configs import models

config = models.PRESETS['smollm2-135m']()
params = model_lib.unstack_layers(model_lib.init_params(config, jax.random.key(0), np.float32))
rng = np.random.default_rng(0)


def forward(tokens_BT, cache):
  out = model_lib.forward(params, config, tokens_BT, cache)
  return out.hiddens_LBPD, out.cache


def compare(setting, prompt_len):
  prompt = jnp.asarray(rng.integers(0, config.vocab_size, (1, prompt_len)), jnp.int32)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (1, 3)), jnp.int32)
  prefill = jax.jit(lambda t, c: forward(t, c))
  cache = prefill(prompt, cache_lib.init_cache(config, 1024))[1]
  hiddens_L3D, cache_3 = prefill(tokens, cache)
  closing, min_rows = model_lib._closing_product, cpu_product.MIN_ROWS
  if setting == 'kernel for 1 row':
    model_lib._closing_product, cpu_product.MIN_ROWS = cpu_product.product, 1
  one_row = jax.jit(lambda t, c: forward(t, c))  # a function of its own: traced under the setting
  rows, cache_1 = [], cache
  for t in range(3):
    hiddens_L1D, cache_1 = one_row(tokens[:, t:t + 1], cache_1)
    rows.append(np.asarray(hiddens_L1D)[:, 0, 0])
  model_lib._closing_product, cpu_product.MIN_ROWS = closing, min_rows
  hiddens_L3D = np.asarray(hiddens_L3D)[:, 0]
  equal_layers = [sum(np.array_equal(hiddens_L3D[l, t], rows[t][l])
                      for l in range(len(rows[t]))) for t in range(3)]
  caches = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               ((cache_3.k_LBSKh, cache_1.k_LBSKh), (cache_3.v_LBSKh, cache_1.v_LBSKh)))
  print(f'| {setting} | {prompt_len} | {equal_layers} of {len(rows[0])} | {caches} |', flush=True)


print('| 1-row pass | prompt | hidden states equal, rows 0-2 | keys and values equal |')
print('|---|---:|---|---|')
for setting in ('as the code runs it', 'kernel for 1 row'):
  for prompt_len in (40, 127, 300, 700):
    compare(setting, prompt_len)
