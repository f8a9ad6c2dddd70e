r"""Plain decoding's step at several pass widths, on stacked and on per-layer weights: random
float32 weights of the SmolLM2-135M shape, so it runs on any machine without the GGUF.

  python docs/results/cpu/pass_width/plain_steps.py                 # from the repository root
  WIDTHS=1,3,9 PROMPT=64 python docs/results/cpu/pass_width/plain_steps.py

A step's time is that of a 65-token generation less that of a 1-token one, over 64 tokens,
from a prompt of $PROMPT random tokens (the median of 3 reps, the decoders in turns), so the
prefill cancels. "compile s" is the first, untimed generation's wall time. It shows where a
wider pass starts to cost on a CPU, and which layout serves each width, as the
`per_layer_by_default` and `CPU_PASS_WIDTH` choices need; not tokens or their acceptance.
"""
import os, platform, time
import numpy as np
import jax
from clasp_jax import engine, model as model_lib, strategies
from clasp_jax.configs import models

config = models.PRESETS['smollm2-135m']()
params = model_lib.init_params(config, jax.random.key(0), np.float32)
prompt = np.random.RandomState(0).randint(0, config.vocab_size, int(os.environ.get('PROMPT', 64)))
WIDTHS = [int(w) for w in os.environ.get('WIDTHS', '1,2,3,5,7,9').split(',')]
cpu = next((l.split(':')[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')),
           platform.processor())
print(f'{cpu}, {len(os.sched_getaffinity(0))} CPUs, jax {jax.__version__}', flush=True)
runs, compile_s = {}, {}
for w in WIDTHS:
  for layout, fast in (('stacked', False), ('per-layer', True)):
    decoder = engine.Decoder(params, config, strategies.Vanilla(), pass_width=w, fast_path=fast)
    t = time.perf_counter(); decoder.generate(prompt.tolist(), 8)
    compile_s[(w, layout)] = time.perf_counter() - t
    runs[(w, layout)] = decoder.generate
step_ms = {k: [] for k in runs}
for _ in range(3):
  for k, gen in runs.items():
    t = time.perf_counter(); gen(prompt.tolist(), 1); first = time.perf_counter() - t
    t = time.perf_counter(); gen(prompt.tolist(), 65); total = time.perf_counter() - t
    step_ms[k].append((total - first) * 1000 / 64)
print('| width | layout | compile s | ms/step |\n|---|---|---|---|')
for (w, layout), v in step_ms.items():
  print(f'| {w} | {layout} | {compile_s[(w, layout)]:.1f} | {np.median(v):.1f} |', flush=True)
