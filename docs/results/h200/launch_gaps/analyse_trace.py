"""Where a traced generation's GPU time goes: busy, idle, and which host calls it waited on.

  python analyse_trace.py static.perfetto.json.gz clasp.perfetto.json.gz

Reads Perfetto traces written by `jax.profiler.trace(..., create_perfetto_trace=True)` around
one `Decoder.generate`. Per trace: the span from the first to the last GPU kernel, the kernels'
busy time, the idle gaps longer than 20 us grouped by the pair of kernels around them, and the
host's CUDA graph launches (`cuGraphLaunch`) by graph.
"""

import collections
import gzip
import json
import statistics
import sys


def analyse(path: str) -> None:
  events = json.load(gzip.open(path))['traceEvents']
  names = {e['pid']: e['args']['name'] for e in events
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  gpu_pid = next(pid for pid, name in names.items() if 'GPU' in name)
  kernels = sorted((e for e in events if e.get('ph') == 'X' and e['pid'] == gpu_pid),
                   key=lambda e: e['ts'])
  span = kernels[-1]['ts'] + kernels[-1]['dur'] - kernels[0]['ts']
  busy = sum(e['dur'] for e in kernels)
  gaps = collections.defaultdict(lambda: [0.0, 0])
  for a, b in zip(kernels, kernels[1:]):
    gap = b['ts'] - (a['ts'] + a['dur'])
    if gap > 20:
      gaps[a['name'][:24], b['name'][:24]][0] += gap
      gaps[a['name'][:24], b['name'][:24]][1] += 1
  print(f'== {path}: span {span / 1e3:.1f} ms, {len(kernels)} kernels busy {busy / 1e3:.1f} ms '
        f'({busy / span:.0%}), idle {(span - busy) / 1e3:.1f} ms')
  print('  idle gaps > 20 us, by the kernels before and after:')
  for (before, after), (total, count) in sorted(gaps.items(), key=lambda x: -x[1][0])[:6]:
    print(f'    {total / 1e3:7.1f} ms in {count:4d}  {before} -> {after}')
  launches = collections.defaultdict(list)
  for e in events:
    if e.get('ph') == 'X' and e['pid'] != gpu_pid and e['name'].startswith('cuGraphLaunch'):
      launches[e['name']].append(e['dur'])
  print('  host cuGraphLaunch calls, by graph:')
  for name, durs in sorted(launches.items(), key=lambda x: -sum(x[1]))[:4]:
    print(f'    {sum(durs) / 1e3:7.1f} ms in {len(durs):4d}, median {statistics.median(durs):6.0f} us'
          f'  {name}')


if __name__ == '__main__':
  for trace in sys.argv[1:]:
    analyse(trace)
