r"""A plain step at one row with the kernel for every product, against the code's 1-row step
(XLA's products, the o and down products as two half-depth products) and its 3-row step
(the kernel): random float32 weights of the SmolLM2-135M shape.

  python docs/results/cpu/row_kernel/one_row_steps.py      # one_row_steps.txt

As `steps.py` (65 tokens less 1, over 64, from a 64-token prompt, median and least of 5, in
turns). The kernel for one row is patched in here (`cpu_product.MIN_ROWS` = 1,
`model._closing_product` replaced by `cpu_product.product`) while that decoder's programs are
traced, not in the code. With `rows.py`, what plain steps at one row inside a 3-row decoder
would cost.
"""
import numpy as np
import jax
import time
from clasp_jax import cpu_product, engine, model as model_lib, strategies
from clasp_jax.configs import models

config = models.PRESETS['smollm2-135m']()
params = model_lib.init_params(config, jax.random.key(0), np.float32)
prompt = np.random.RandomState(0).randint(0, config.vocab_size, 64).tolist()
closing, min_rows = model_lib._closing_product, cpu_product.MIN_ROWS
decoders = {}
for name, width, one_row_kernel in (('width 1, as the code runs it', 1, False),
                                     ('width 1, the kernel for every product', 1, True),
                                     ('width 3, the kernel', 3, False)):
  if one_row_kernel:
    model_lib._closing_product, cpu_product.MIN_ROWS = cpu_product.product, 1
  decoder = engine.Decoder(params, config, strategies.Vanilla(), pass_width=width)
  decoder.generate(prompt, 65); decoder.generate(prompt, 1)  # traced and compiled here
  model_lib._closing_product, cpu_product.MIN_ROWS = closing, min_rows
  decoders[name] = decoder
steps_ms = {name: [] for name in decoders}
for _ in range(5):
  for name, decoder in decoders.items():
    start = time.perf_counter(); decoder.generate(prompt, 65); long = time.perf_counter() - start
    start = time.perf_counter(); decoder.generate(prompt, 1); short = time.perf_counter() - start
    steps_ms[name].append((long - short) / 64 * 1e3)
print('| plain step | ms (median) | ms (least) |\n|---|---:|---:|')
for name, ms in steps_ms.items():
  print(f'| {name} | {np.median(ms):.2f} | {min(ms):.2f} |')
