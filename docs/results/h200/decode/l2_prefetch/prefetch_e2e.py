"""Plain decoding through `Decoder.generate` with and without an L2 prefetch of the next
products' weights inside the attention kernel (`pf.py`), one process, the variants in turns
(random bf16 weights, 1024 tokens of context). ms/token = (t(160) - t(32)) / 128, medians of
3 timed generations of each length after an untimed one.

  OUT=<folder> PRESETS=smollm2-135m python docs/results/h200/decode/l2_prefetch/prefetch_e2e.py
  OUT=<folder> PRESETS=llama3-8b python docs/results/h200/decode/l2_prefetch/prefetch_e2e.py

Variants: 'none' (the library's kernel), 'wo' (each program of the attention's split kernel
also loads its share of the o product's weight, after its attention work), 'wo_before' (the
same, before it), 'wo+mlp' (the o, gate/up and down weights, after). Also checks that static
drafting (every other layer skipped, K = 8, DET 0) gives plain decoding's tokens with 'wo'.
"""
import json, os, sys, time
import numpy as np, jax
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pf
from clasp_jax import strategies
from clasp_jax.bench import decode
from clasp_jax.configs import models
from clasp_jax.engine import Decoder

pf.install()
OUT = os.environ.get('OUT', '/tmp')
PRESETS = os.environ.get('PRESETS', 'smollm2-135m,llama3-8b').split(',')
CTX, SHORT, LONG, REPS = 1024, 32, 160, int(os.environ.get('REPS', 3))
VARIANTS = {
    'none': None,
    'wo': lambda lp: [lp['wo']],
    'wo+mlp': lambda lp: [lp['wo'], lp['w_gate_up'], lp['w_down']],
    'wo_before': lambda lp: [lp['wo']],
}
rows = []
for preset in PRESETS:
  config = models.PRESETS[preset]()
  params = decode.random_params(config, jax.random.key(0), 'bfloat16')
  names = ['none', 'wo', 'wo+mlp'] if preset == 'smollm2-135m' else ['none', 'wo', 'wo_before']
  prompt = np.random.RandomState(0).randint(0, config.vocab_size, CTX - LONG).tolist()
  decs, toks = {}, {}
  for name in names:
    pf.PICK = VARIANTS[name]
    pf.MODE = 'before' if name.endswith('before') else 'after'
    d = Decoder(params, config, strategies.build('vanilla', config), attention='pallas')
    d.generate(prompt, SHORT)
    toks[name] = d.generate(prompt, LONG).token_ids
    decs[name] = d
    if name == 'wo':  # exactness: static drafting against this plain decoding
      L = config.num_layers
      st = Decoder(params, config, strategies.build(
          'static', config, skip_set=tuple(range(1, L, 2))[:L // 2], num_draft_tokens=8,
          draft_exit_threshold=0.0), attention='pallas')
      same = list(st.generate(prompt, LONG).token_ids) == list(toks[name])
      print(json.dumps(dict(preset=preset, variant=name, static_equals_plain=same)), flush=True)
  times = {n: {SHORT: [], LONG: []} for n in names}
  for _ in range(REPS):
    for n in names:
      for length in (SHORT, LONG):
        t = time.perf_counter()
        decs[n].generate(prompt, length)
        times[n][length].append(time.perf_counter() - t)
  for n in names:
    ms = 1e3 * (np.median(times[n][LONG]) - np.median(times[n][SHORT])) / (LONG - SHORT)
    row = dict(preset=preset, variant=n, ms_per_token=round(float(ms), 4),
               same_tokens=list(toks[n]) == list(toks['none']))
    rows.append(row)
    print(json.dumps(row), flush=True)
  del decs
json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0]), rows=rows),
          open(f"{OUT}/prefetch_{'_'.join(PRESETS)}.json", 'w'), indent=1)
