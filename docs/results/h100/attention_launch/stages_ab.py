"""Plain decoding through Decoder.generate with the split kernel's (and fold's) NUM_STAGES 2
(the library's) and 1, two decoders in one process timed in turns (the median of 5 generations of 32 and of 160
new tokens each; ms a token from their difference). Rows to $OUT/stages.jsonl.

  OUT=<folder> python stages_ab.py
"""
import json, os, time
import numpy as np, jax, jax.numpy as jnp
from clasp_jax import attention_pallas as ap
from clasp_jax.bench import decode as bd
from clasp_jax.configs import models
OUT = os.environ.get('OUT', '/tmp')
SHORT, LONG, REPS = 32, 160, 5
for preset, context in (('llama3-8b', 4096), ('llama3-8b', 1024), ('smollm2-135m', 1024)):
  config = models.PRESETS[preset]()
  params = bd.random_params(config, jax.random.key(0), jnp.bfloat16)
  prompt = np.random.RandomState(0).randint(0, config.vocab_size, context - LONG).tolist()
  decoders = {}
  for st in (2, 1):
    ap.NUM_STAGES = st
    jax.clear_caches()
    d = bd._decoder(params, config, bd.case_strategy('plain', config), 'auto', None)
    for n in (SHORT, LONG):
      d.generate(prompt, n)
    decoders[st] = d
  times = {st: {n: [] for n in (SHORT, LONG)} for st in decoders}
  tokens = {}
  for _ in range(REPS):
    for st, d in decoders.items():
      for n in (SHORT, LONG):
        t = time.perf_counter(); out = d.generate(prompt, n); times[st][n].append(time.perf_counter() - t)
        tokens[st, n] = out.token_ids
  for st in decoders:
    med = {n: float(np.median(times[st][n])) for n in (SHORT, LONG)}
    row = dict(preset=preset, context=context, stages=st,
               ms_per_token=round(1e3 * (med[LONG] - med[SHORT]) / (LONG - SHORT), 4),
               same_tokens_as_stages2=tokens[st, LONG] == tokens[2, LONG])
    print(json.dumps(row), flush=True)
    with open(f'{OUT}/stages.jsonl', 'a') as f:
      f.write(json.dumps(row) + '\n')
  del decoders, params
