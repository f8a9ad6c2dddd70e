"""Scratch: plain decoding with the Pallas decode attention's launch constants varied."""
import json, os, time
import numpy as np
import jax
from clasp_jax import strategies, attention_pallas as ap
from clasp_jax.engine import Decoder
from clasp_jax.bench import planted, planted_sweep
from clasp_jax.configs import models

OUT = os.environ['OUT']; NEW = int(os.environ.get('NEW', 192))
preset = os.environ.get('PRESET', 'llama3-8b')
config = models.PRESETS[preset]()
spec = planted.planted_model(config, epsilon=0.02, seed=0)
params = planted.build_params(spec, 'bfloat16', per_layer=True)
prompts = planted_sweep.make_prompts(config.vocab_size, 7, int(os.environ.get('PROMPT_LEN', 64)), 0)
V = json.loads(os.environ['VARIANTS'])  # name -> {constant: value} or "xla"
default = dict(KEY_BLOCK=ap.KEY_BLOCK, SPLIT_SIZE=ap.SPLIT_SIZE, NUM_WARPS=ap.NUM_WARPS, NUM_STAGES=ap.NUM_STAGES)
decs = {}
for name, setting in V.items():
  jax.clear_caches()
  for k, v in default.items(): setattr(ap, k, v)
  if setting != 'xla':
    for k, v in setting.items(): setattr(ap, k, v)
  decs[name] = Decoder(params, config, strategies.Vanilla(), attention='xla' if setting == 'xla' else 'pallas')
  t = time.time(); decs[name].generate(prompts[0], NEW); print('warm', name, round(time.time() - t, 1), flush=True)
res = {k: [] for k in decs}
for i in range(2):
  for p in prompts[1:4]:
    for name, d in decs.items():
      g = d.generate(p, NEW); res[name].append((g.wall_time, g.new_tokens, g.token_ids))
base = res[next(iter(res))]
summary = {}
for name, rs in res.items():
  summary[name] = dict(ms_token=1e3 * sum(r[0] for r in rs) / sum(r[1] for r in rs),
                       same_as_first=all(r[2] == b[2] for r, b in zip(rs, base)))
  print(name, V[name], summary[name], flush=True)
json.dump(dict(preset=preset, variants=V, summary=summary, jax=jax.__version__), open(f'{OUT}/summary.json', 'w'), indent=1)
