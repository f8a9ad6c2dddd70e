r"""Plain decoding's step at widths 1 and 3, its products by the CPU product kernel and by
XLA: random float32 weights of the SmolLM2-135M shape, so it runs on any machine without the
GGUF.

  python docs/results/cpu/row_kernel/steps.py      # from the repository root

A step's time is that of a 65-token generation less that of a 1-token one, over 64 tokens,
from a 64-token prompt (median and least of 5 reps, the decoders in turns), so the prefill
cancels. At width 1 the kernel does not apply (`cpu_product.MIN_ROWS`): the two rows are one
program, a check on the noise.
"""
import os, platform, time
import numpy as np
import jax
from clasp_jax import engine, model as model_lib, strategies
from clasp_jax.configs import models

config = models.PRESETS['smollm2-135m']()
params = model_lib.init_params(config, jax.random.key(0), np.float32)
prompt = np.random.RandomState(0).randint(0, config.vocab_size, 64).tolist()
cpu = next((l.split(':')[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')),
           platform.processor())
print(f'{cpu}, {len(os.sched_getaffinity(0))} CPUs, jax {jax.__version__}', flush=True)
decoders = {}
for width in (1, 3):
  for name, on in (('xla', False), ('kernel', None)):
    decoder = engine.Decoder(params, config, strategies.Vanilla(), pass_width=width, cpu_kernel=on)
    decoder.generate(prompt, 65); decoder.generate(prompt, 1)
    decoders[f'width {width}, {name}'] = decoder
steps_ms = {name: [] for name in decoders}
for _ in range(5):
  for name, decoder in decoders.items():
    start = time.perf_counter(); decoder.generate(prompt, 65); long = time.perf_counter() - start
    start = time.perf_counter(); decoder.generate(prompt, 1); short = time.perf_counter() - start
    steps_ms[name].append((long - short) / 64 * 1e3)
print('| plain step | ms (median) | ms (least) |\n|---|---:|---:|')
for name, ms in steps_ms.items():
  print(f'| {name} | {np.median(ms):.2f} | {min(ms):.2f} |')
