"""CLaSp's segments ending only where the skip set changes, against ending at every refresh,
in one process on a planted model: the same compiled programs, only the host's schedule
differs (the A/B of commit "segments run on through refreshes that keep the skip set").

  OUT=<folder> PRESET=llama3-8b EPSILON=0.02 python ab_segments.py

Decoders, each generation in turn over the prompts (REPS passes): plain decoding, static
drafting with the planted set, and CLaSp at M = L/2 for each LOI in LOIS, once as the library
schedules it (`on_change`: one segment per change of the skip set) and once with a segment
per refresh (`every_refresh`, the schedule before). K = 8, DET 0.7, no prompt lookup, greedy.
"""

import dataclasses
import json
import os
import time

import jax
import numpy as np

from clasp_jax import strategies
from clasp_jax.bench import planted
from clasp_jax.bench import planted_sweep
from clasp_jax.engine import Decoder
from clasp_jax.strategies.base import Segment, SchedulePolicy
from clasp_jax.strategies.clasp import Clasp

PRESET = os.environ.get('PRESET', 'llama3-8b')
EPSILON = float(os.environ.get('EPSILON', '0.02'))
LOIS = [int(x) for x in os.environ.get('LOIS', '4,1').split(',')]
NEW = int(os.environ.get('NEW', '192'))
PROMPTS = int(os.environ.get('PROMPTS', '3'))
REPS = int(os.environ.get('REPS', '2'))


class EveryRefresh(SchedulePolicy):
  """The schedule before: a segment of the refresh period, whatever the table says."""

  def next_segment(self, decoder, state):
    state, segment = super().next_segment(decoder, state)
    if segment.refresh_every:
      segment = Segment(draft=True, rounds=segment.refresh_every)
    return state, segment


@dataclasses.dataclass(frozen=True)
class ClaspEveryRefresh(Clasp):

  def make_policy(self, decoder, max_new_tokens):
    return EveryRefresh(self)


def main():
  spec = planted.planted_model(PRESET, epsilon=EPSILON)
  config = spec.config
  params = planted.build_params(spec, 'bfloat16', per_layer=True)
  common = dict(num_draft_tokens=8, draft_exit_threshold=0.7, lookup=False)
  M = config.num_layers // 2
  decoders = {'vanilla': Decoder(params, config, strategies.Vanilla()),
              'static': Decoder(params, config, strategies.build(
                  'static', config, skip_set=tuple(spec.planted), **common))}
  for loi in LOIS:
    decoders[f'clasp_loi{loi}_on_change'] = Decoder(
        params, config, Clasp(num_skip=M, loi=loi, **common))
    decoders[f'clasp_loi{loi}_every_refresh'] = Decoder(
        params, config, ClaspEveryRefresh(num_skip=M, loi=loi, **common))
  candidates = planted_sweep.make_prompts(config.vocab_size, 8, 64)
  for decoder in decoders.values():  # compiles; loads each program's kernels
    decoder.generate(candidates[-1], NEW)
  kept, _ = planted_sweep.screen_prompts(decoders['vanilla'], candidates[:-1], PROMPTS, NEW)
  prompts = [candidates[i] for i in kept]
  runs = {name: [] for name in decoders}
  for rep in range(REPS):
    for i, prompt in enumerate(prompts):
      names = list(decoders)
      k = (rep * len(prompts) + i) % len(names)
      for name in names[k:] + names[:k]:
        g = decoders[name].generate(prompt, NEW)
        runs[name].append(dict(prompt=i, wall=g.wall_time, tokens=g.token_ids,
                               rounds=len(g.accept_lengths), refreshes=len(g.refresh_times),
                               changes=int(np.any(np.diff(g.skip_sets, axis=0), axis=1).sum())
                               if len(g.skip_sets) > 1 else 0))
  rows = {}
  for name, gens in runs.items():
    wall = sum(g['wall'] for g in gens)
    tokens = sum(len(g['tokens']) for g in gens)
    rounds = sum(g['rounds'] for g in gens)
    rows[name] = dict(
        tokens_per_second=tokens / wall, ms_per_round=1e3 * wall / rounds,
        tau=tokens / rounds, segments_per_generation=np.mean([g['refreshes'] for g in gens]),
        set_changes_per_generation=np.mean([g['changes'] for g in gens]),
        identical=sum(g['tokens'] == v['tokens'] for g, v in zip(gens, runs['vanilla'])),
        generations=len(gens))
  for name, row in rows.items():
    row['speedup'] = row['tokens_per_second'] / rows['vanilla']['tokens_per_second']
  out = dict(preset=PRESET, epsilon=EPSILON, new_tokens=NEW, prompts=kept, reps=REPS,
             planted=list(spec.planted), device_kind=jax.devices()[0].device_kind,
             jax_version=jax.__version__, rows=rows)
  print('| decoder | tok/s | speedup | ms/round | tau | host refreshes / gen | set changes / gen '
        '| identical |')
  print('|---|---|---|---|---|---|---|---|')
  for name, r in rows.items():
    print(f"| {name} | {r['tokens_per_second']:.1f} | {r['speedup']:.3f}x | "
          f"{r['ms_per_round']:.2f} | {r['tau']:.2f} | {r['segments_per_generation']:.1f} | "
          f"{r['set_changes_per_generation']:.1f} | {r['identical']}/{r['generations']} |")
  with open(os.path.join(os.environ.get('OUT', '.'), f'ab_{PRESET}_eps{EPSILON:g}.json'),
            'w') as f:
    json.dump(out, f, indent=1, default=float)


if __name__ == '__main__':
  main()
