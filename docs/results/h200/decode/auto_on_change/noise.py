"""auto's measured step costs, timed once per segment (repeats=1, the code before) and as the
median of three (repeats=3), interleaved in one process, on the SmolLM2 shape."""
import json, os, time
import numpy as np
from clasp_jax import strategies
from clasp_jax.bench import planted, planted_sweep
from clasp_jax.engine import Decoder
from clasp_jax.strategies import adaptive
spec = planted.planted_model('smollm2-135m', epsilon=1.0)
config = spec.config
params = planted.build_params(spec, 'bfloat16', per_layer=True)
d = Decoder(params, config, strategies.build('clasp', config, skip_layers='auto', lookup=False))
state = d.start(planted_sweep.make_prompts(config.vocab_size, 2, 64)[0], 192)
grid = d.strategy.candidates
pair = (grid[0], grid[-1])
adaptive.measure_costs(d, state, 192, pair, repeats=1)  # compiles
rows = []
t0 = time.time()
while time.time() - t0 < float(os.environ.get('SECONDS_BUDGET', 60)):
  for repeats in (1, 3):
    c = adaptive.measure_costs(d, state, 192, pair, repeats=repeats)
    rows.append(dict(repeats=repeats, **{k: v * 1e3 for k, v in vars(c).items()}))
    print(repeats, {k: round(v * 1e3, 3) for k, v in vars(c).items()}, flush=True)
for r in (1, 3):
  base = [x['draft_base'] for x in rows if x['repeats'] == r]
  print(f'repeats={r}: draft_base ms over {len(base)}: min {min(base):.3f} median {np.median(base):.3f} max {max(base):.3f}')
json.dump(rows, open(os.path.join(os.environ['OUT'], 'noise.json'), 'w'), indent=1)
