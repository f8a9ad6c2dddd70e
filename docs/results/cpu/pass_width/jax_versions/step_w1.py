# Plain step at width 1 (per-layer loop), SmolLM2-135M shape, random f32 weights: ms/step; with
# KINDS=1 also counts fusion kinds and custom calls in the optimized plain program.
import os, re, time, collections
import numpy as np
import jax
from clasp_jax import engine, model as model_lib, strategies
from clasp_jax.configs import models
config = models.PRESETS['smollm2-135m']()
params = model_lib.init_params(config, jax.random.key(0), np.float32)
prompt = np.random.RandomState(0).randint(0, config.vocab_size, 64).tolist()
decoder = engine.Decoder(params, config, strategies.Vanilla(), pass_width=1, fast_path=True)
t = time.perf_counter(); decoder.generate(prompt, 8); c = time.perf_counter() - t
ms = []
for _ in range(3):
  t = time.perf_counter(); decoder.generate(prompt, 1); first = time.perf_counter() - t
  t = time.perf_counter(); decoder.generate(prompt, 49); total = time.perf_counter() - t
  ms.append((total - first) * 1000 / 48)
print(f"{os.environ.get('XLA_FLAGS', '(default)')!s:60s} compile {c:.1f} s  step {np.median(ms):.1f} ms  {[round(m, 1) for m in ms]}", flush=True)
if os.environ.get('KINDS'):
  progs = {n: (f, a) for n, f, a in decoder._programs(64, 8)}
  f, a = progs['plain']
  text = f.compiled(*a).as_text()
  open(os.path.join(os.environ.get('OUT', '.'), f"plain_hlo_{jax.__version__}.txt"), 'w').write(text)
  cnt = collections.Counter(re.findall(r'kind=k\w+|custom_call_target="[^"]+"|__\w+_fusion| (?:dot|custom-call|conditional|while|copy)\(', text))
  print(jax.__version__, dict(cnt.most_common(20)), flush=True)
