"""Scratch script, kept as it ran: where CLaSp's round loses to static at the planted 8B shape.

Environment: OUT (output folder), PRESET (llama3-8b), EPS (0.02), NEW (new tokens, 192),
REPS (passes over the three prompts, 2), ONLY (methods, comma-separated), TRACE (methods to
trace, static,clasp), SHAPE (JSON of LlamaConfig overrides, for a quick CPU check). Writes
summary.json and <method>.perfetto.json.gz to OUT (see analyse_trace.py). Since the runs in
README.md, each trace goes to a fresh folder (it went to a fixed one, which a second run on the
same machine found its predecessor's trace in).
"""
import json, os, sys, time, glob, tempfile
import numpy as np
import jax
from clasp_jax import strategies
from clasp_jax.engine import Decoder
from clasp_jax.bench import planted, planted_sweep
from clasp_jax.configs import models

OUT = os.environ['OUT']
NEW = int(os.environ.get('NEW', 192))
config = models.PRESETS[os.environ.get('PRESET', 'llama3-8b')]()
import dataclasses
if os.environ.get('SHAPE'): config = dataclasses.replace(config, **json.loads(os.environ['SHAPE']))
spec = planted.planted_model(config, epsilon=float(os.environ.get('EPS', 0.02)), seed=0)
t0 = time.time()
params = planted.build_params(spec, 'bfloat16', per_layer=True)
print('built', time.time() - t0, flush=True)
prompts = planted_sweep.make_prompts(config.vocab_size, 7, 64, 0)
M = len(spec.planted)
variants = {
  'vanilla': dict(method='vanilla'),
  'static': dict(method='static', skip_set=tuple(spec.planted)),
  'clasp': dict(method='clasp', skip_layers=M, loi=4),
  'clasp-dp-pass': dict(method='clasp', skip_layers=M, loi=4, dp_in_verify=False),
  'clasp-loi64': dict(method='clasp', skip_layers=M, loi=64),
}
only = os.environ.get('ONLY')
if only: variants = {k: v for k, v in variants.items() if k in only.split(',')}
decs = {}
for name, kw in variants.items():
  kw = dict(kw); method = kw.pop('method')
  s = strategies.build(method, config, num_draft_tokens=8, draft_exit_threshold=0.7,
                       lookup=False, **kw)
  decs[name] = Decoder(params, config, s)
  t = time.time(); decs[name].generate(prompts[0], NEW); print('warm', name, time.time() - t, flush=True)
res = {k: [] for k in decs}
for i in range(int(os.environ.get('REPS', 2))):
  for p in prompts[1:4]:
    for name, d in decs.items():
      g = d.generate(p, NEW)
      res[name].append(dict(wall=g.wall_time, tokens=g.new_tokens, rounds=len(g.accept_lengths),
                            refresh=sum(g.refresh_times), nref=len(g.refresh_times),
                            tau=float(np.mean(g.accept_lengths)), ids=g.token_ids))
summary = {}
base = res['vanilla']
for name, rs in res.items():
  same = all(r['ids'] == b['ids'] for r, b in zip(rs, base))
  sec_round = sum(r['wall'] for r in rs) / sum(r['rounds'] for r in rs)
  summary[name] = dict(tok_s=sum(r['tokens'] for r in rs) / sum(r['wall'] for r in rs),
                       ms_round=1e3 * sec_round, tau=float(np.mean([r['tau'] for r in rs])),
                       refresh_ms_per_gen=1e3 * np.mean([r['refresh'] for r in rs]),
                       refreshes=float(np.mean([r['nref'] for r in rs])),
                       rounds=float(np.mean([r['rounds'] for r in rs])), identical=same)
  print(name, summary[name], flush=True)
json.dump(dict(summary=summary, runs={k: [{kk: vv for kk, vv in r.items() if kk != 'ids'} for r in v]
                                      for k, v in res.items()}), open(f'{OUT}/summary.json', 'w'), indent=1)
for name in os.environ.get('TRACE', 'static,clasp').split(','):
  if name not in decs: continue
  d = tempfile.mkdtemp(prefix=f'trace_{name}_')
  with jax.profiler.trace(d, create_perfetto_trace=True):
    g = decs[name].generate(prompts[1], NEW)
    print('traced', name, g.wall_time, len(g.accept_lengths), flush=True)
  for f in glob.glob(f'{d}/**/*perfetto_trace.json.gz', recursive=True):
    os.system(f'cp {f} {OUT}/{name}.perfetto.json.gz')
print(os.listdir(OUT))
