"""Scratch: plain and drafting rounds with several rounds (or draft steps) per host check.

Needs `unroll.patch` or `chunk.patch` applied (engine.UNROLL; layer_skip.DRAFT_UNROLL in the
former). See README.md."""
import json, os, time, dataclasses
import numpy as np
import jax
from clasp_jax import strategies, engine
from clasp_jax.strategies import layer_skip
from clasp_jax.engine import Decoder
from clasp_jax.bench import planted, planted_sweep
from clasp_jax.configs import models

OUT = os.environ['OUT']; NEW = int(os.environ.get('NEW', 192))
preset = os.environ.get('PRESET', 'llama3-8b')
config = models.PRESETS[preset]()
spec = planted.planted_model(config, epsilon=float(os.environ.get('EPS', 0.02)), seed=0)
t0 = time.time(); params = planted.build_params(spec, 'bfloat16', per_layer=True)
print('built', round(time.time() - t0, 1), flush=True)
prompts = planted_sweep.make_prompts(config.vocab_size, 7, int(os.environ.get('PROMPT_LEN', 64)), 0)
M = len(spec.planted)
V = json.loads(os.environ['VARIANTS'])  # name -> [method, round_unroll, draft_unroll]
decs = {}
for name, (method, ru, du) in V.items():
  kw = {'vanilla': {}, 'static': dict(skip_set=tuple(spec.planted)),
        'clasp': dict(skip_layers=M, loi=4)}[method]
  s = strategies.build(method, config, num_draft_tokens=8, draft_exit_threshold=0.7, lookup=False, **kw)
  engine.UNROLL = {'plain': ru, 'draft': ru, 'lookup': ru}; layer_skip.DRAFT_UNROLL = du
  decs[name] = Decoder(params, config, s)
  t = time.time(); decs[name].generate(prompts[0], NEW)
  print('warm', name, round(time.time() - t, 1), flush=True)
res = {k: [] for k in decs}
for i in range(int(os.environ.get('REPS', 2))):
  for p in prompts[1:4]:
    for name, d in decs.items():
      g = d.generate(p, NEW)
      res[name].append(dict(wall=g.wall_time, tokens=g.new_tokens, rounds=len(g.accept_lengths),
                            tau=float(np.mean(g.accept_lengths)), ids=g.token_ids))
summary = {}
base = res[next(iter(res))]
for name, rs in res.items():
  wall = sum(r['wall'] for r in rs)
  summary[name] = dict(ms_token=1e3 * wall / sum(r['tokens'] for r in rs),
                       ms_round=1e3 * wall / sum(r['rounds'] for r in rs),
                       tau=float(np.mean([r['tau'] for r in rs])),
                       identical=all(r['ids'] == b['ids'] for r, b in zip(rs, base)))
  print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in summary[name].items()}, flush=True)
json.dump(dict(preset=preset, variants=V, summary=summary, jax=jax.__version__,
               device=str(jax.devices()[0].device_kind)), open(f'{OUT}/summary.json', 'w'), indent=1)
import glob, re
for name in os.environ.get('TRACE', '').split(','):
  if name not in decs: continue
  d = f'/tmp/trace_{name}'
  with jax.profiler.trace(d, create_perfetto_trace=True):
    g = decs[name].generate(prompts[1], NEW)
  print('traced', name, g.wall_time, len(g.accept_lengths), flush=True)
  for f in glob.glob(f'{d}/**/*perfetto_trace.json.gz', recursive=True):
    os.system(f'cp {f} {OUT}/{name}.perfetto.json.gz')
