"""Scratch: why --skip_layers=auto keeps M = 13 on the planted 8B model at epsilon 0."""
import collections, dataclasses, os, time
import numpy as np
from clasp_jax import strategies
from clasp_jax.engine import Decoder
from clasp_jax.strategies import adaptive
from clasp_jax.bench import planted, planted_sweep
from clasp_jax.configs import models

config = models.PRESETS[os.environ.get('PRESET', 'llama3-8b')]()
spec = planted.planted_model(config, epsilon=0.0, seed=0)
params = planted.build_params(spec, os.environ.get('DTYPE', 'bfloat16'), per_layer=True)
print('planted', sorted(spec.planted), flush=True)
prompts = planted_sweep.make_prompts(config.vocab_size, 6, 64, 0)
s = strategies.build('clasp', config, skip_layers='auto', num_draft_tokens=8,
                     draft_exit_threshold=0.7, loi=4, lookup=False)
print(s.candidates, s.initial_skip_layers, flush=True)
d = Decoder(params, config, s)
orig_observe = adaptive.AdaptivePolicy.observe
def observe(self, a, dr, src):
  orig_observe(self, a, dr, src)
  obs = self._observed()
  rates = {m: round(adaptive.best_num_skip({m: obs[m]}, self.costs, self.L, self.interval, 8)[1], 3) for m in obs}
  print(f'  seg M={self.num_skip} rounds={len(np.asarray(a))} -> chosen={self.chosen} limit={self.draft_limit} '
        f'interval={self.interval} segs={self.draft_segments} speedups={rates}', flush=True)
adaptive.AdaptivePolicy.observe = observe
for i, p in enumerate(prompts[:int(os.environ.get('GENS', 5))]):
  t = time.time(); g = d.generate(p, int(os.environ.get('NEW', 192)))
  print(f'gen {i}: {time.time() - t:.1f} s, tau {g.mean_accepted:.2f}, M per round',
        dict(collections.Counter(g.skip_layers_per_round)), flush=True)
  if i == 0: print('costs', d.adaptive_policy.costs, flush=True)
pol = d.adaptive_policy
print('tallies', {m: (round(t.rounds, 1), pol.tallies[m].estimate(pol.s.prior_alpha, pol.s.prior_weight, pol.s.optimism)) for m, t in pol.tallies.items()})
