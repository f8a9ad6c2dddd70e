"""Replays auto's policy, as of this checkout and as of another (BASE), on the host: the
segments each asks for over five 192-token generations whose layer-skip drafts are all
rejected, under the step costs `auto` measured on the H200 in the SmolLM2-shape run
(`planted_smollm2_eps1_new.json`'s call). Prints whether the two schedules are the same.

    BASE=<a checkout of 56e135c> python docs/results/h200/decode/auto_on_change/replay.py
"""
import importlib.util
import os
import sys

import numpy as np

sys.path.insert(0, 'tests')
from clasp_jax.strategies import adaptive  # noqa: E402
from clasp_jax.strategies.base import PLAIN, SKIP  # noqa: E402
from test_adaptive import _FakeDecoder, _FakeState  # noqa: E402

spec = importlib.util.spec_from_file_location(
    'base_adaptive', os.path.join(os.environ['BASE'], 'clasp_jax/strategies/adaptive.py'))
base = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = base
spec.loader.exec_module(base)
COSTS = dict(full_step=0.001002, draft_base=5.5e-05, draft_per_layer=2.96e-05, verify=0.001758,
             dp=0.00416)  # costs/costs.json of that call, rounded


def schedule(module):
  strategy = module.AdaptiveClasp(candidates=(3, 6, 9, 12, 15, 18), initial_skip_layers=6,
                                  lookup=False)
  policy = module.AdaptivePolicy(strategy, 30, module.Costs(**COSTS))
  decoder, segments = _FakeDecoder(searches_in_verify=True), []
  for generation in range(5):
    policy.start_generation(192)
    left = 191  # rounds after the prefill's token, one token each
    while left > 0:
      _, segment = policy.next_segment(decoder, _FakeState())
      n = min(segment.rounds or left, left)
      segments.append((generation, segment.kind, segment.rounds,
                       policy.num_skip if segment.kind == 'draft' else None))
      if segment.kind == 'draft':  # every draft rejected: one token a round
        policy.observe(np.full(n, 1), np.full(n, 2), np.full(n, SKIP))
      else:
        policy.observe(np.ones(n), np.zeros(n), np.full(n, PLAIN))
      left -= n
  return segments


now, then = schedule(adaptive), schedule(base)
print('same schedule:', now == then)
for segment in now:
  print(segment)
