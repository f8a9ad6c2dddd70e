r"""Whether each row of a 3-row pass computes what a 1-row pass of its token computes, bit for
bit, as a decoder with rows apart runs them (`Decoder(rows_apart=True)`: per-layer buffers, the
kernels' products and attention, logits by row): random float32 weights of the
SmolLM2-135M shape, a pass of 3 tokens after a prompt of P random tokens against three 1-row
passes; every layer's hidden states, each row's logits, the keys and values written.

  python docs/results/cpu/plain_one_row/rows.py      # from the repository root; rows.txt
"""
import functools
import numpy as np
import jax
import jax.numpy as jnp
from clasp_jax import cache as cache_lib, cpu_attention, cpu_product, engine, model as model_lib
from clasp_jax import xla_options
from clasp_jax.configs import models

config = models.PRESETS['smollm2-135m']()
params = model_lib.unstack_layers(model_lib.init_params(config, jax.random.key(0), np.float32))
rng = np.random.default_rng(0)
full_pass = functools.partial(engine.full_pass, params, config,
                              attention=cpu_attention.row_attention, logits=False)


def jit(fn):
  """`fn` compiled as a decoder's programs are (its options, precision and products)."""
  jitted = jax.jit(fn, compiler_options=xla_options.compiler_options())

  def run(*args):
    with jax.default_matmul_precision('highest'), cpu_product.use_kernel(True):
      return jitted.lower(*args).compile()(*args)
  return run


def passes(tokens_T, cache, widths):
  hiddens, logits = [], []
  for start, width in widths:
    _, hiddens_LWD, cache, _ = full_pass(tokens_T[start:start + width], cache, width=width)
    hiddens.append(hiddens_LWD)
    logits += [engine.row_logits(params, config, hiddens_LWD)(t) for t in range(width)]
  return jnp.concatenate(hiddens, axis=1), jnp.stack(logits), cache


print('| prompt | hidden states equal (of 31 layers), rows 0-2 | logits equal | keys and values '
      'equal |')
print('|---:|---|---|---|')
for prompt_len in (40, 127, 300, 700, 1500):
  prompt = jnp.asarray(rng.integers(0, config.vocab_size, (1, prompt_len)), jnp.int32)
  tokens_T = jnp.asarray(rng.integers(0, config.vocab_size, (3,)), jnp.int32)
  cache = jax.jit(lambda t, c: model_lib.forward(params, config, t, c).cache)(
      prompt, cache_lib.init_cache(config, 2048))
  h3, l3, c3 = jit(lambda c: passes(tokens_T, c, [(0, 3)]))(cache)
  h1, l1, c1 = jit(lambda c: passes(tokens_T, c, [(0, 1), (1, 1), (2, 1)]))(cache)
  layers = [sum(np.array_equal(h3[l, t], h1[l, t]) for l in range(h3.shape[0])) for t in range(3)]
  caches = all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in ((c3.k_LBSKh, c1.k_LBSKh), (c3.v_LBSKh, c1.v_LBSKh)))
  print(f'| {prompt_len} | {layers} | {np.array_equal(l3, l1)} | {caches} |', flush=True)
