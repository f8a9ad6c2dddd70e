"""EXPERIMENT: RMSNorm's factor materialised, the normalisation in the products' prologue
('pro') or epilogue ('epi'), against the library ('fused'); plain decoding, in turns."""
import collections, glob, gzip, json, os, tempfile, time
import numpy as np
import jax
from clasp_jax import model as model_lib, strategies
from clasp_jax.engine import Decoder
from clasp_jax.bench import planted
from clasp_jax.configs import models

OUT = os.environ['OUT']
MODES = os.environ.get('MODES', 'fused,pro,epi').split(',')
REPS = int(os.environ.get('REPS', 5))
CTX = int(os.environ.get('CTX', 1024))

def traced(d, prompt, new):
  folder = tempfile.mkdtemp()
  with jax.profiler.trace(folder, create_perfetto_trace=True):
    d.generate(prompt, new)
  (path,) = glob.glob(f'{folder}/**/*perfetto_trace.json.gz', recursive=True)
  ev = json.load(gzip.open(path))['traceEvents']
  names = {e['pid']: e['args']['name'] for e in ev if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  agg = collections.defaultdict(lambda: [0.0, 0])
  for e in ev:
    if e.get('ph') == 'X' and 'GPU' in names.get(e['pid'], ''):
      agg[e['name']][0] += e['dur']; agg[e['name']][1] += 1
  return agg

results = {}
for preset in os.environ.get('PRESETS', 'smollm2-135m,llama3-8b').split(','):
  config = models.PRESETS[preset]()
  params = planted.build_params(planted.planted_model(config, epsilon=0.02), 'bfloat16', per_layer=True)
  prompt = np.random.RandomState(0).randint(10, config.vocab_size, CTX - 160).tolist()
  decs, toks = {}, {}
  for m in MODES:
    model_lib.NORM_MODE = m
    d = Decoder(params, config, strategies.Vanilla())
    toks[m] = d.generate(prompt, 160).token_ids
    d.generate(prompt, 32); d.generate(prompt, 48); d.generate(prompt, 1)
    jax.clear_caches()
    decs[m] = d
  times = collections.defaultdict(list)
  for _ in range(REPS):
    for m in MODES:
      t0 = time.perf_counter(); decs[m].generate(prompt, 160); t1 = time.perf_counter()
      decs[m].generate(prompt, 32); t2 = time.perf_counter()
      times[m].append(((t1 - t0) - (t2 - t1)) / 128)
  rows = {}
  for m in MODES:
    long_, short = traced(decs[m], prompt, 48), traced(decs[m], prompt, 1)
    agg = {n: [v[0] - short.get(n, [0, 0])[0], v[1] - short.get(n, [0, 0])[1]] for n, v in long_.items()}
    agg = {n: v for n, v in agg.items() if v[1] > 0}
    per = 47 * config.num_layers
    ms = float(np.median(times[m])) * 1e3
    rows[m] = dict(ms_per_token=ms, all_ms=[t * 1e3 for t in times[m]], same_tokens=toks[m] == toks[MODES[0]],
                   kernels_per_token=sum(v[1] for v in agg.values()) / 47,
                   busy_ms_per_token=sum(v[0] for v in agg.values()) / 1e3 / 47,
                   kernels=[(n[:80], round(d_ / per, 2), round(c / per, 2)) for n, (d_, c) in sorted(agg.items(), key=lambda x: -x[1][0])][:24])
    print(preset, m, {k: v for k, v in rows[m].items() if k != 'kernels'}, flush=True)
    for k in rows[m]['kernels']:
      print('   ', k)
  results[preset] = rows
  del decs, params
json.dump(results, open(f'{OUT}/norm_exp.json', 'w'), indent=1)
