"""EXPERIMENT: static vs CLaSp (DP riders in the verify passes) rounds, in turns, one process."""
import collections, glob, gzip, json, os, sys, tempfile, time
import numpy as np
import jax
from clasp_jax import strategies
from clasp_jax.engine import Decoder
from clasp_jax.bench import planted
from clasp_jax.configs import models

OUT, TAG = os.environ['OUT'], sys.argv[1]
preset = os.environ.get('PRESET', 'llama3-8b')
NEW, REPS, NP = 128, int(os.environ.get('REPS', 3)), 3
config = models.PRESETS[preset]()
spec = planted.planted_model(config, epsilon=0.02)
params = planted.build_params(spec, 'bfloat16', per_layer=True)
prompts = [np.random.RandomState(s).randint(10, config.vocab_size, 64).tolist() for s in range(NP)]
M = len(spec.planted)
decs = {'vanilla': Decoder(params, config, strategies.Vanilla()),
        'static': Decoder(params, config, strategies.build('static', config, skip_set=tuple(spec.planted))),
        'clasp': Decoder(params, config, strategies.build('clasp', config, skip_layers=M, loi=4, lookup=False))}
toks = {n: [d.generate(p, NEW).token_ids for p in prompts] for n, d in decs.items()}
secs, rounds = collections.defaultdict(float), collections.defaultdict(int)
for _ in range(REPS):
  for p in prompts:
    for n, d in decs.items():
      t0 = time.perf_counter(); g = d.generate(p, NEW); secs[n] += time.perf_counter() - t0
      rounds[n] += len(g.accept_lengths)

def traced(d):
  folder = tempfile.mkdtemp()
  with jax.profiler.trace(folder, create_perfetto_trace=True):
    d.generate(prompts[0], NEW)
  (path,) = glob.glob(f'{folder}/**/*perfetto_trace.json.gz', recursive=True)
  ev = json.load(gzip.open(path))['traceEvents']
  names = {e['pid']: e['args']['name'] for e in ev if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  busy = [e['dur'] for e in ev if e.get('ph') == 'X' and 'GPU' in names.get(e['pid'], '')]
  return dict(kernels=len(busy), busy_ms=sum(busy) / 1e3)

res = dict(tag=TAG, preset=preset, new_tokens=NEW, prompts=NP, reps=REPS, jax=jax.__version__)
for n in decs:
  res[n] = dict(seconds=secs[n], rounds=rounds[n], ms_per_round=1e3 * secs[n] / rounds[n],
                tok_per_s=NEW * NP * REPS / secs[n], same_as_plain=toks[n] == toks['vanilla'],
                **traced(decs[n]))
  print(TAG, n, res[n], flush=True)
print(TAG, 'clasp/static time', res['clasp']['seconds'] / res['static']['seconds'], flush=True)
json.dump(res, open(f'{OUT}/riders_ab_{TAG}_{preset}.json', 'w'), indent=1)
