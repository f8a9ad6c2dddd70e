"""Where a zero-round segment's time goes, on the SmolLM2 shape (auto's refresh-cost probe)."""
import time, jax, numpy as np
from clasp_jax import strategies
from clasp_jax.bench import planted, planted_sweep
from clasp_jax.engine import Decoder
from clasp_jax.strategies import adaptive, layer_skip
from clasp_jax.strategies.base import Segment
spec = planted.planted_model('smollm2-135m', epsilon=1.0)
config = spec.config
params = planted.build_params(spec, 'bfloat16', per_layer=True)
d = Decoder(params, config, strategies.build('clasp', config, skip_layers='auto', lookup=False))
st = d.start(planted_sweep.make_prompts(config.vocab_size, 2, 64)[0], 192)
st = d.put_skip_set(st, layer_skip.skip_vector(config, layer_skip.evenly_spaced_skip_set(config, 3)))
for r in (0, 0, 0, 0, 4, 4, 0, 0):
  print(r, [round(x * 1e3, 2) if isinstance(x, float) else x for x in adaptive._timed_segment(d, st, Segment(True, r), 192)], flush=True)
for _ in range(3):
  s = adaptive._copy(st); jax.block_until_ready(s)
  t = time.perf_counter(); out, rep = d.run_segment(s, Segment(True, 0), 192); jax.block_until_ready(rep); t1 = time.perf_counter()
  print('dispatch+ready', round((t1 - t) * 1e3, 2), flush=True)
