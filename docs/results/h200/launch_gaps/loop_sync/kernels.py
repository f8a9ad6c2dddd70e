"""Kernel time per token by kernel name, from a Perfetto trace of one generation."""
import collections, gzip, json, sys
path, tokens = sys.argv[1], int(sys.argv[2])
ev = json.load(gzip.open(path))['traceEvents']
names = {e['pid']: e['args']['name'] for e in ev if e.get('ph') == 'M' and e.get('name') == 'process_name'}
k = [e for e in ev if e.get('ph') == 'X' and 'GPU' in names.get(e['pid'], '')]
agg = collections.defaultdict(lambda: [0.0, 0])
for e in k:
  agg[e['name']][0] += e['dur']; agg[e['name']][1] += 1
print(f'{path}: {len(k)} kernels, {len(k) / tokens:.0f} a token, busy {sum(v[0] for v in agg.values()) / 1e3 / tokens:.3f} ms a token')
for n, (d, c) in sorted(agg.items(), key=lambda x: -x[1][0])[:16]:
  print(f'{d / 1e3 / tokens:8.3f} ms/token {c / tokens:6.1f}/token {d / c:8.1f} us  {n[:60]}')
