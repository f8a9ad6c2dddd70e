"""Does auto's draft-limit model (each draft accepted independently at one rate) pick the
limit that the rounds themselves say is best? CLaSp at the planted M, K = 8, on the tiny
planted model of tests/test_planted.py (CPU), at the epsilons given:

    python docs/results/h200/planted_unbiased/auto_abfbbc3/limit_check_cpu.py 0.05,0.2

For each limit d it prints what the observed rounds would have given (min(accepted, d) + 1
tokens and min(drafted, d) drafts each: greedy drafts are the same tokens up to d) beside
the model's estimate from the same rounds' counts, and the limit each picks under the
accelerator step costs that tests/test_planted.py scores `auto` with.
"""

import collections
import pathlib
import sys

import numpy as np

from clasp_jax import strategies
from clasp_jax.bench import planted
from clasp_jax.engine import Decoder
from clasp_jax.strategies import adaptive

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[5] / 'tests'))
import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position

K, PROMPTS, NEW, LOI = 8, 6, 96, 4
CONFIG = tiny.tiny_config(num_layers=8, hidden_size=128, head_dim=32, intermediate_size=256,
                          vocab_size=512, eos_token_ids=())
# tests/test_planted.py's ACCELERATOR_COSTS, in plain steps.
COSTS = adaptive.Costs(full_step=1.0, draft_base=0.1, draft_per_layer=0.84 / 8, verify=1.0,
                       dp=2.4)


def main(epsilons: str) -> None:
  for eps in map(float, epsilons.split(',')):
    spec = planted.planted_model(CONFIG, epsilon=eps)
    num_skip = len(spec.planted)
    decoder = Decoder(planted.build_params(spec), CONFIG, strategies.build(
        'clasp', CONFIG, skip_layers=num_skip, lookup=False, num_draft_tokens=K, loi=LOI))
    rounds = []
    for prompt in tiny.prompts(CONFIG, count=PROMPTS, length=24):
      g = decoder.generate(prompt, NEW)
      rounds += [(d, a) for a, d, s in zip(g.accept_lengths, g.draft_lengths, g.draft_sources)
                 if s == 'skip']
    drafted_R, committed_R = np.array(rounds).T
    accepted_R = committed_R - 1
    # The policy's estimates (`adaptive._Tally`, no prior): acceptance and continuation.
    alpha = accepted_R.sum() / (accepted_R.sum() + (accepted_R < drafted_R).sum())
    cont = np.maximum(drafted_R - 1, 0).sum()
    rate_c = cont / (cont + (drafted_R < K).sum())
    step = COSTS.draft_step(CONFIG.num_layers - num_skip)
    print(f'epsilon {eps}: {len(rounds)} rounds, tau {committed_R.mean():.2f}, drafts a round '
          f'{drafted_R.mean():.2f}, a {alpha:.3f}, c {rate_c:.3f}')
    print('  rounds by (drafts, committed):', sorted(collections.Counter(rounds).items()))
    best = {}
    for d in range(1, K + 1):
      observed = ((np.minimum(accepted_R, d) + 1).mean(), np.minimum(drafted_R, d).mean())
      drafts = adaptive.expected_drafts(rate_c, d)
      modelled = (adaptive.expected_tokens(alpha, drafts), drafts)
      line = []
      for name, (tokens, n) in (('rounds', observed), ('model', modelled)):
        rate = tokens / (n * step + COSTS.verify + COSTS.dp / LOI)
        best[name] = max(best.get(name, (0.0, 0)), (rate, d))
        line.append(f'{name}: {tokens:.2f} tokens, {n:.2f} drafts, {rate:.3f} a plain step')
      print(f'  limit {d}: ' + ' | '.join(line))
    print('  best limit: ' + ', '.join(f'{name} {d} ({rate:.3f})'
                                       for name, (rate, d) in best.items()))


if __name__ == '__main__':
  main(sys.argv[1] if len(sys.argv) > 1 else '0.05,0.2')
