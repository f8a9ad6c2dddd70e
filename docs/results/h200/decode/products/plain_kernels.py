"""The GPU kernels of warm plain decoding through `Decoder.generate`, per layer and token.

Random bf16 weights of each preset (the planted family's generator, per-layer layout), an
860-token prompt; a 48-token generation traced, less a 1-token one (the prefill's kernels).
Writes plain_kernels_<preset>.json under $OUT, and the optimized HLO of the plain segment the
generations ran, <preset>_plain_segment0.hlo.txt.gz (what `layer_map/layer_kernels.py` reads).

The HLO dump was added for the run of `layer_map/` (commit af3428d); the JSONs beside this
script come from the same code without it (commit ec6b150; the library is the same at both)."""
import collections, glob, gzip, json, os, tempfile
import numpy as np
import jax
from clasp_jax import strategies
from clasp_jax.engine import Decoder
from clasp_jax.bench import planted
from clasp_jax.configs import models

OUT = os.environ['OUT']
NEW = 48
for preset in os.environ.get('PRESETS', 'llama3-8b,smollm2-135m').split(','):
  config = models.PRESETS[preset]()
  params = planted.build_params(planted.planted_model(config, epsilon=0.02), 'bfloat16', per_layer=True)
  prompt = np.random.RandomState(0).randint(10, config.vocab_size, 860).tolist()
  d = Decoder(params, config, strategies.Vanilla())
  d.generate(prompt, NEW); d.generate(prompt, NEW)
  walls = [d.generate(prompt, NEW).wall_time for _ in range(3)]
  def traced(new):
    """Kernel name -> [microseconds, calls] of one generation of `new` tokens."""
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
  # The decode steps alone: a generation of NEW tokens less one of 1 (the prefill's kernels).
  long_, short = traced(NEW), traced(1)
  agg = {n: [v[0] - short.get(n, [0, 0])[0], v[1] - short.get(n, [0, 0])[1]] for n, v in long_.items()}
  agg = {n: v for n, v in agg.items() if v[1] > 0}
  calls = sum(v[1] for v in agg.values())
  per = (NEW - 1) * config.num_layers
  rows = [dict(kernel=n, us_per_layer_token=d_ / per, calls_per_layer_token=c / per, us_per_call=d_ / c)
          for n, (d_, c) in sorted(agg.items(), key=lambda x: -x[1][0])]
  summary = dict(preset=preset, new_tokens=NEW, wall_ms_per_token_untraced=[1e3 * w / NEW for w in walls],
                 busy_ms_per_token=sum(v[0] for v in agg.values()) / 1e3 / (NEW - 1),
                 kernels_per_token=calls / (NEW - 1), jax=jax.__version__, kernels=rows)
  json.dump(summary, open(f'{OUT}/plain_kernels_{preset}.json', 'w'), indent=1)
  for kind, fn in d._segments.items():  # the compiled programs, as XLA optimized them
    for i, executable in enumerate(fn._compiled.values()):
      with gzip.open(f'{OUT}/{preset}_{kind}_segment{i}.hlo.txt.gz', 'wt') as f:
        f.write(executable.as_text())
  print(preset, {k_: v for k_, v in summary.items() if k_ != 'kernels'}, flush=True)
  for r in rows[:24]:
    print(f"{r['us_per_layer_token']:8.2f} us/layer-token {r['calls_per_layer_token']:5.2f} calls {r['us_per_call']:7.1f} us/call  {r['kernel'][:90]}")
  del d, params
