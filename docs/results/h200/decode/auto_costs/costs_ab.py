"""measure_costs before (11bb08f's) and after 3a6e3bb, interleaved, on the planted 8B model.

  BASE=<a checkout of 11bb08f> OUT=<folder> python costs_ab.py   # from the repository root
"""
import dataclasses, importlib.util, json, os, sys
from clasp_jax import strategies
from clasp_jax.bench import planted, planted_sweep
from clasp_jax.engine import Decoder
from clasp_jax.strategies import adaptive as new

spec_ = importlib.util.spec_from_file_location(
    'old_adaptive', os.path.join(os.environ['BASE'], 'clasp_jax/strategies/adaptive.py'))
old = sys.modules["old_adaptive"] = importlib.util.module_from_spec(spec_)
spec_.loader.exec_module(old)
spec = planted.planted_model(os.environ.get('PRESET', 'llama3-8b'), epsilon=0.02)
config = spec.config
params = planted.build_params(spec, 'bfloat16', per_layer=True)
decoder = Decoder(params, config, strategies.build('clasp', config, skip_layers='auto', lookup=False))
prompt = planted_sweep.make_prompts(config.vocab_size, 8, 64)[0]
state = decoder.start(prompt, 192)
grid = decoder.strategy.candidates
pair = (grid[0], grid[-1])
out = dict(grid=grid, pair=pair, old=[], new=[])
for rep in range(3):
  for name, mod in (('old', old), ('new', new)):
    c = dataclasses.asdict(mod.measure_costs(decoder, state, 192, pair))
    out[name].append(c)
    print(name, {k: round(v * 1e3, 3) for k, v in c.items()}, flush=True)
json.dump(out, open(os.environ['OUT'] + '/costs_ab.json', 'w'), indent=1)
