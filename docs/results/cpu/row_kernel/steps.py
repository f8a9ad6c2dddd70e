r"""Plain decoding's step at widths 1 and 3, its products by the CPU product kernel and by
XLA: random float32 weights of the SmolLM2-135M shape, so it runs on any machine without the
GGUF.

  python docs/results/cpu/row_kernel/steps.py                     # steps.txt
  SETTINGS=one_row python docs/results/cpu/row_kernel/steps.py    # one_row_steps.txt

A step's time is that of a 65-token generation less that of a 1-token one, over 64 tokens,
from a 64-token prompt (median and least of 5 reps, the decoders in turns), so the prefill
cancels. At width 1 the kernel does not apply (`cpu_product.MIN_ROWS`): the two width-1 rows
of the default settings are one program, a check on the noise.

`SETTINGS=one_row`: a 1-row step with the kernel for every product, against the code's 1-row
step (XLA's products, o and down as two half-depth products) and its 3-row step. The kernel for
one row is patched in (`cpu_product.MIN_ROWS` = 1, `model._closing_product` replaced by
`cpu_product.product`) while that decoder's programs are traced, not in the code. With
`rows.py`, what plain steps at one row inside a 3-row decoder would cost.
"""
import os, platform, time
import numpy as np
import jax
from clasp_jax import cpu_product, engine, model as model_lib, strategies
from clasp_jax.configs import models

config = models.PRESETS['smollm2-135m']()
params = model_lib.init_params(config, jax.random.key(0), np.float32)
prompt = np.random.RandomState(0).randint(0, config.vocab_size, 64).tolist()
cpu = next((l.split(':')[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')),
           platform.processor())
# name: (width, cpu_kernel, the kernel for 1-row products too)
SETTINGS = {
    'default': {'width 1, xla': (1, False, False), 'width 1, kernel': (1, None, False),
                'width 3, xla': (3, False, False), 'width 3, kernel': (3, None, False)},
    'one_row': {'width 1, as the code runs it': (1, None, False),
                'width 1, the kernel for every product': (1, None, True),
                'width 3, the kernel': (3, None, False)},
}[os.environ.get('SETTINGS', 'default')]
if os.environ.get('SETTINGS', 'default') == 'default':
  print(f'{cpu}, {len(os.sched_getaffinity(0))} CPUs, jax {jax.__version__}', flush=True)
closing, min_rows = model_lib._closing_product, cpu_product.MIN_ROWS
decoders = {}
for name, (width, on, one_row_kernel) in SETTINGS.items():
  if one_row_kernel:
    model_lib._closing_product, cpu_product.MIN_ROWS = cpu_product.product, 1
  decoder = engine.Decoder(params, config, strategies.Vanilla(), pass_width=width, cpu_kernel=on)
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
