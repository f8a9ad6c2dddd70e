"""Kernels of a CLaSp round (DP riders in the verify pass) against a static round, per round."""
import collections, glob, gzip, json, os, tempfile, time
import numpy as np
import jax
from clasp_jax import strategies
from clasp_jax.engine import Decoder
from clasp_jax.bench import planted
from clasp_jax.configs import models

OUT = os.environ['OUT']
preset = os.environ.get('PRESET', 'llama3-8b')
NEW = 64
config = models.PRESETS[preset]()
spec = planted.planted_model(config, epsilon=0.02)
params = planted.build_params(spec, 'bfloat16', per_layer=True)
prompt = np.random.RandomState(0).randint(10, config.vocab_size, 64).tolist()
M = len(spec.planted)
decs = {'static': Decoder(params, config, strategies.build('static', config, skip_set=tuple(spec.planted))),
        'clasp': Decoder(params, config, strategies.build('clasp', config, skip_layers=M, loi=4, lookup=False))}

def traced(d, new):
  folder = tempfile.mkdtemp()
  with jax.profiler.trace(folder, create_perfetto_trace=True):
    g = d.generate(prompt, new)
  (path,) = glob.glob(f'{folder}/**/*perfetto_trace.json.gz', recursive=True)
  ev = json.load(gzip.open(path))['traceEvents']
  names = {e['pid']: e['args']['name'] for e in ev if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  agg = collections.defaultdict(lambda: [0.0, 0])
  for e in ev:
    if e.get('ph') == 'X' and 'GPU' in names.get(e['pid'], ''):
      agg[e['name']][0] += e['dur']; agg[e['name']][1] += 1
  return agg, g

res = {}
for name, d in decs.items():
  for _ in range(2):
    g = d.generate(prompt, NEW)
  walls = [d.generate(prompt, NEW) for _ in range(3)]
  agg, g = traced(d, NEW)
  rounds = len(g.accept_lengths)
  res[name] = dict(agg=agg, rounds=rounds, tokens=list(g.token_ids), wall=[w.wall_time for w in walls])
  print(name, 'rounds', rounds, 'wall', [round(w.wall_time, 4) for w in walls], flush=True)
  for kind, fn in d._segments.items():
    for i, ex in enumerate(fn._compiled.values()):
      with gzip.open(f'{OUT}/{preset}_{name}_{kind}_{i}.hlo.txt.gz', 'wt') as f:
        f.write(ex.as_text())
print('identical', res['static']['tokens'] == res['clasp']['tokens'])
out = {}
for name in res:
  out[name] = {k: v for k, v in res[name].items() if k != 'agg'}
  out[name]['kernels'] = sorted(([k, v[0], v[1]] for k, v in res[name]['agg'].items()), key=lambda x: -x[1])
json.dump(out, open(f'{OUT}/rider_kernels_{preset}.json', 'w'))
for name in res:
  a = res[name]['agg']
  print(name, 'busy ms', sum(v[0] for v in a.values()) / 1e3, 'calls', sum(v[1] for v in a.values()))
keys = set(res['static']['agg']) | set(res['clasp']['agg'])
diff = sorted(((res['clasp']['agg'].get(k, [0, 0])[0] - res['static']['agg'].get(k, [0, 0])[0],
                res['clasp']['agg'].get(k, [0, 0])[1] - res['static']['agg'].get(k, [0, 0])[1], k) for k in keys), reverse=True)
for dt, dc, k in diff[:40]:
  print(f'{dt/1e3:9.3f} ms {dc:7d} calls  {k[:110]}')
