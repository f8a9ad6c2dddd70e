# measure_costs repeated in one process on the embedded model with the CPU's default method:
# the spread of each figure.
import numpy as np
import clasp_jax
from clasp_jax import strategies
from clasp_jax.strategies import adaptive
model = clasp_jax.load()
strategy = strategies.build('clasp', model.config)
decoder = clasp_jax.Decoder(model.params, model.config, strategy)
prompt = clasp_jax.encode_prompt(model, 'Why is the sky blue?', chat=True)
decoder.generate(prompt, 16)  # compiles (its own cost measurement included)
state = decoder.start(prompt, 128)
pair = (strategy.candidates[0], strategy.candidates[-1])
rows = []
for i in range(8):
  c = adaptive.measure_costs(decoder, state, 128, pair)
  rows.append(c)
  print(i, {k: round(v * 1000, 2) for k, v in vars(c).items()}, flush=True)
for k in vars(rows[0]):
  v = np.array([getattr(r, k) for r in rows]) * 1000
  print(f'{k:16s} median {np.median(v):7.2f} ms  min {v.min():7.2f}  max {v.max():7.2f}')
