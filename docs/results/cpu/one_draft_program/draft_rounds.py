# Draft rounds on a CPU's per-layer loop: the active layers' buffers (a program per M) against
# every layer with a lax.cond (one program): ms per round, static skip sets, K = 2, DET 0.
import re, time
import numpy as np
import jax
from clasp_jax import engine, model as model_lib, strategies
from clasp_jax.configs import models
from clasp_jax.strategies.base import Segment
config = models.PRESETS['smollm2-135m']()
params = model_lib.unstack_layers(model_lib.init_params(config, jax.random.key(0), np.float32))
prompt = np.random.RandomState(0).randint(0, config.vocab_size, 64).tolist()
L = config.num_layers
decs = {}
for M in (6, 15):
  for mode in (True, False):
    st = strategies.build('static', config, skip_set=tuple(range(1, L, L // M))[:M], num_draft_tokens=2, draft_exit_threshold=0.0)
    d = engine.Decoder(params, config, st, pass_width=3, fast_path=True)
    d.drafts_active_layers = mode
    t = time.perf_counter(); g = d.generate(prompt, 8); c = time.perf_counter() - t
    decs[(M, mode)] = (d, c)
    progs = {n: (f, a) for n, f, a in d._programs(64, 8)}
    name = [n for n in progs if n.startswith('draft')][0]
    f, a = progs[name]
    text = f.compiled(*a).as_text()
    shape = ','.join(map(str, a[1].cache.k_LBSKh.shape))
    copies = len(re.findall(rf'= f32\[{shape}\]\S* copy\(', text))
    print(f'M={M} active_layers={mode}: first generate {c:.1f} s, programs {sorted(progs)}, cache copies in {name}: {copies}', flush=True)
res = {k: [] for k in decs}
toks = {}
for _ in range(3):
  for k, (d, _) in decs.items():
    t = time.perf_counter(); g1 = d.generate(prompt, 1); first = time.perf_counter() - t
    t = time.perf_counter(); g = d.generate(prompt, 49); total = time.perf_counter() - t
    res[k].append((total - first) * 1000 / (len(g.accept_lengths) - len(g1.accept_lengths))); toks[k] = list(g.token_ids)
for k, v in res.items():
  print(k, f'{np.median(v):.1f} ms/round', [round(x, 1) for x in v], 'same tokens as active:', toks[k] == toks[(k[0], True)])
