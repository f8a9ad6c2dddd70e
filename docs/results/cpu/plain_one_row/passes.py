r"""What a pass costs with each attention a CPU's 3-row decoder could run: random float32
weights of the SmolLM2-135M shape, per-layer buffers, the kernel's products, a pass after a
prompt of P random tokens (ms, median of 15, the passes in turns).

  python docs/results/cpu/plain_one_row/passes.py      # from the repository root; passes.txt
  python docs/results/cpu/plain_one_row/passes.py "3 rows, batched" "1 row, kernel"  # some

- 3 rows, batched: `attention.cache_attention` (`_chunk_attention`), the verify pass of a
  decoder without rows apart, and its plain step (which pads its 1 token to 3 rows).
- 3 rows, jnp row by row: `attention.row_attention`, a product per row.
- 3 rows, kernel: `cpu_attention.row_attention`, the verify pass of a decoder with rows apart.
- 1 row, jnp: `attention.row_attention` (what `cache_attention` runs for 1 row).
- 1 row, kernel: the plain step of a decoder with rows apart.
"""
import sys
import time
import numpy as np
import jax
import jax.numpy as jnp
from clasp_jax import attention, cache as cache_lib, cpu_attention, cpu_product, engine
from clasp_jax import model as model_lib, xla_options
from clasp_jax.configs import models

config = models.PRESETS['smollm2-135m']()
params = model_lib.unstack_layers(model_lib.init_params(config, jax.random.key(0), np.float32))
rng = np.random.default_rng(0)
PASSES = {'3 rows, batched': (attention.cache_attention, 3),
          '3 rows, jnp row by row': (attention.row_attention, 3),
          '3 rows, kernel': (cpu_attention.row_attention, 3),
          '1 row, jnp': (attention.row_attention, 1),
          '1 row, kernel': (cpu_attention.row_attention, 1)}
if sys.argv[1:]:  # the columns named, in the order named
  PASSES = {name: PASSES[name] for name in sys.argv[1:]}


def compiled(attend, rows, args):
  fn = jax.jit(lambda t, c: engine.full_pass(params, config, t[:rows], c, width=rows,
                                              attention=attend, logits=False)[1],
               compiler_options=xla_options.compiler_options())
  with jax.default_matmul_precision('highest'), cpu_product.use_kernel(True):
    return fn.lower(*args).compile()


print('| prompt | ' + ' | '.join(PASSES) + ' |')
print('|---:|' + '---:|' * len(PASSES))
for prompt_len in (100, 400, 800, 1500):
  prompt = jnp.asarray(rng.integers(0, config.vocab_size, (1, prompt_len)), jnp.int32)
  cache = jax.jit(lambda t, c: model_lib.forward(params, config, t, c).cache)(
      prompt, cache_lib.init_cache(config, 2048))
  args = (jnp.asarray([5, 6, 7], jnp.int32), cache)
  fns = {name: compiled(attend, rows, args) for name, (attend, rows) in PASSES.items()}
  seconds = {name: [] for name in fns}
  for _ in range(15):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      seconds[name].append(time.perf_counter() - start)
  print(f'| {prompt_len} | ' + ' | '.join(f'{np.median(s) * 1000:.2f}' for s in seconds.values())
        + ' |', flush=True)
