"""Where a chain of 30 empty Pallas kernels spends its time: per kernel, GPU time and the gaps
between kernels, from a profiler trace; beside XLA's closing halves and the persistent kernel."""
import collections, functools, glob, gzip, json, os, tempfile
import numpy as np, jax, jax.numpy as jnp
import persistent_finish as P
ws = P.make_weights(P.CONFIG, P.CONFIG.num_layers, jnp.bfloat16)
x = jnp.ones((16, 576), jnp.bfloat16)
out = {}
for k in ('empty', 'barriers', 'xla', 'persistent'):
  f = functools.partial(jax.jit(functools.partial(P.chain, kind=k, eps=1e-5)), ws=ws)
  for _ in range(5): f(x, x).block_until_ready()
  folder = tempfile.mkdtemp()
  with jax.profiler.trace(folder, create_perfetto_trace=True):
    for _ in range(5): f(x, x).block_until_ready()
  (path,) = glob.glob(f'{folder}/**/*perfetto_trace.json.gz', recursive=True)
  ev = json.load(gzip.open(path))['traceEvents']
  names = {e['pid']: e['args']['name'] for e in ev if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  gpu = sorted([e for e in ev if e.get('ph') == 'X' and 'GPU' in names.get(e['pid'], '')], key=lambda e: e['ts'])
  agg = collections.defaultdict(lambda: [0.0, 0])
  for e in gpu: agg[e['name'][:60]][0] += e['dur']; agg[e['name'][:60]][1] += 1
  busy = sum(e['dur'] for e in gpu)
  gaps = [b['ts'] - (a['ts'] + a['dur']) for a, b in zip(gpu, gpu[1:])]
  small = [g for g in gaps if g < 100]  # within a call
  out[k] = dict(kernels=len(gpu) / 5, busy_us_per_layer=busy / 5 / 30,
                gap_us_median=float(np.median(small)), gap_us_per_layer=sum(small) / 5 / 30,
                per_kernel={n: [v[0] / v[1], v[1] / 5] for n, v in agg.items()})
  print(k, json.dumps(out[k]), flush=True)
json.dump(out, open(os.path.join(os.environ.get('OUT', '.'), 'frames_trace.json'), 'w'), indent=1)
