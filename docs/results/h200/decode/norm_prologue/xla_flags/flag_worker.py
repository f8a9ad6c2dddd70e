"""EXPERIMENT: plain decoding ms/token under this process's XLA_FLAGS (one preset)."""
import hashlib, json, os, sys, time
import numpy as np
import jax
from clasp_jax import strategies
from clasp_jax.engine import Decoder
from clasp_jax.bench import planted
from clasp_jax.configs import models

preset, tag = sys.argv[1], sys.argv[2]
config = models.PRESETS[preset]()
params = planted.build_params(planted.planted_model(config, epsilon=0.02), 'bfloat16', per_layer=True)
prompt = np.random.RandomState(0).randint(10, config.vocab_size, 1024 - 160).tolist()
d = Decoder(params, config, strategies.Vanilla())
t0 = time.perf_counter()
toks = d.generate(prompt, 160).token_ids
d.generate(prompt, 32)
compile_s = time.perf_counter() - t0
per = []
for _ in range(int(os.environ.get('REPS', 7))):
  t0 = time.perf_counter(); d.generate(prompt, 160); t1 = time.perf_counter()
  d.generate(prompt, 32); t2 = time.perf_counter()
  per.append(((t1 - t0) - (t2 - t1)) / 128 * 1e3)
row = dict(preset=preset, tag=tag, flags=os.environ.get('XLA_FLAGS', ''), ms=float(np.median(per)),
           all_ms=per, compile_s=compile_s, tokens=hashlib.md5(str(toks).encode()).hexdigest()[:10])
print(json.dumps(row), flush=True)
with open(os.environ['OUT'] + '/flags.jsonl', 'a') as f:
  f.write(json.dumps(row) + '\n')
