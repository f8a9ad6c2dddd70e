"""Where CLaSp's LOI-1 round (the DP's bands in the verify passes) spends its extra time over
static drafting with the same M: GPU kernels by name per round, from one traced generation of
each (160 and 32 new tokens, the difference)."""
import collections, glob, gzip, json, os, re, sys, tempfile, time
import jax, numpy as np
from clasp_jax.bench import decode
from clasp_jax.configs import models
from clasp_jax.engine import Decoder

preset = sys.argv[1]
config = models.PRESETS[preset]()
params = decode.random_params(config, jax.random.key(0), 'bfloat16')
prompt = np.random.RandomState(0).randint(0, config.vocab_size, 1024 - 160).tolist()


def trace(decoder, n):
  folder = tempfile.mkdtemp()
  with jax.profiler.trace(folder, create_perfetto_trace=True):
    out = decoder.generate(prompt, n)
  (path,) = glob.glob(f'{folder}/**/*perfetto_trace.json.gz', recursive=True)
  ev = json.load(gzip.open(path))['traceEvents']
  names = {e['pid']: e['args']['name'] for e in ev
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  agg, cnt = collections.defaultdict(float), collections.defaultdict(int)
  for e in ev:
    if e.get('ph') == 'X' and 'GPU' in names.get(e['pid'], '') and 'Memcpy' not in e['name']:
      key = re.sub(r'[._]\d+$', '', e['name'])
      agg[key] += e['dur']
      cnt[key] += 1
  return agg, cnt, len(out.accept_lengths), len(getattr(out, 'refresh_times', ()))


res = {}
for what in ('draft', 'refresh'):
  dec = Decoder(params, config, decode.case_strategy(what, config))
  for n in (32, 160):
    dec.generate(prompt, n)
  (a1, c1, r1, f1), (a2, c2, r2, f2) = trace(dec, 32), trace(dec, 160)
  rounds = r2 - r1
  per = {k: ((a2.get(k, 0) - a1.get(k, 0)) / rounds, (c2.get(k, 0) - c1.get(k, 0)) / rounds)
         for k in set(a1) | set(a2)}
  res[what] = dict(rounds=rounds, refreshes=f2 - f1, per=per,
                   busy=sum(v[0] for v in per.values()), kernels=sum(v[1] for v in per.values()))
  print(what, 'rounds', rounds, 'refreshes', f2 - f1, 'busy us/round %.1f' % res[what]['busy'],
        'kernels/round %.1f' % res[what]['kernels'], flush=True)
d, r = res['draft']['per'], res['refresh']['per']
rows = sorted(((r.get(k, (0, 0))[0] - d.get(k, (0, 0))[0], r.get(k, (0, 0))[1] - d.get(k, (0, 0))[1],
                k) for k in set(d) | set(r)), reverse=True)
print('extra us/round, extra calls/round, kernel')
for us, c, k in rows[:30]:
  print('%8.1f %7.1f  %s' % (us, c, k[:110]))
print('...', '%8.1f' % sum(x[0] for x in rows[30:]))
out = os.environ.get('OUT')
if out:
  json.dump(res, open(f'{out}/band_profile_{preset}.json', 'w'), indent=1)
