"""SmolLM2 shape (random bf16 weights, 1024 tokens of context), plain decoding through
`Decoder.generate` with `fused_mlp.patch` applied: XLA's MLP against the fused kernel at
several block sizes, one process, the variants in turns; ms/token from 32- and 160-token
generations (medians of 5). Ran on an H100: mlp_tune.json, README.md."""
import json, os, time
import numpy as np, jax
from clasp_jax import strategies, mlp_pallas, model as model_lib
from clasp_jax.bench import decode
from clasp_jax.configs import models
from clasp_jax.engine import Decoder

OUT = os.environ.get('OUT', '/tmp')
CTX, SHORT, LONG, REPS = 1024, 32, 160, 5
_fused = model_lib.fused_mlp
VARIANTS = {'xla': None, 'h32c64': (32, 64), 'h32c128': (32, 128), 'h32c256': (32, 256),
            'h16c128': (16, 128), 'h64c128': (64, 128)}
config = models.PRESETS['smollm2-135m']()
params = decode.random_params(config, jax.random.key(0), 'bfloat16')
prompt = np.random.RandomState(0).randint(0, config.vocab_size, CTX - LONG).tolist()
decs, toks = {}, {}
for name, v in VARIANTS.items():
  try:
    model_lib.fused_mlp = (lambda lp, x: False) if v is None else _fused
    if v:
      mlp_pallas.HIDDEN_BLOCK, mlp_pallas.COLUMN_BLOCK = v
    d = Decoder(params, config, strategies.build('vanilla', config))
    d.generate(prompt, SHORT)
    toks[name] = list(d.generate(prompt, LONG).token_ids)
    decs[name] = d
  except Exception as e:
    print('FAILED', name, type(e).__name__, str(e)[:300], flush=True)
times = {n: {SHORT: [], LONG: []} for n in decs}
for _ in range(REPS):
  for n, d in decs.items():
    for L in (SHORT, LONG):
      t = time.perf_counter(); d.generate(prompt, L); times[n][L].append(time.perf_counter() - t)
rows = []
for n in decs:
  ms = 1e3 * (np.median(times[n][LONG]) - np.median(times[n][SHORT])) / (LONG - SHORT)
  rows.append(dict(variant=n, ms_per_token=round(float(ms), 4), tok_s=round(1e3 / ms, 1),
                   same_tokens_as_first_fused=toks[n] == toks.get('h32c64')))
  print(json.dumps(rows[-1]), flush=True)
json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0]), rows=rows), open(f'{OUT}/mlp_tune.json', 'w'), indent=1)
