"""Prefill wall time of SmolLM2's shape (random bf16 weights) per prompt length, against a
256-token generation from the same prompt."""
import time, numpy as np, jax
from clasp_jax.bench import decode
from clasp_jax.configs import models
from clasp_jax.engine import Decoder
from clasp_jax import strategies
config = models.PRESETS['smollm2-135m']()
params = decode.random_params(config, jax.random.key(0), 'bfloat16')
d = Decoder(params, config, strategies.Vanilla())
rng = np.random.RandomState(0)
for n in (60, 200, 400, 769):
  p = rng.randint(0, config.vocab_size, n).tolist()
  d.generate(p, 1); d.generate(p, 256)
  pre = np.median([d.generate(p, 1).wall_time for _ in range(5)])
  full = np.median([d.generate(p, 256).wall_time for _ in range(3)])
  print(f'prompt {n}: prefill {pre*1e3:.1f} ms, 256 tokens {full*1e3:.1f} ms, prefill share {pre/full:.1%}', flush=True)
