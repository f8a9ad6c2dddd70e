"""Plain decoding and the default method with each token's logits a row at a time
(`Decoder(logits_by_row=True)`, the CPU default) and as the pass's 9-row product (False),
beside transformers' greedy `generate`, taking turns per prompt.

  python docs/results/cpu/row_logits/ab.py            # writes ab.json beside this script
  REPS=1 QUESTIONS=2 OUT=ab_12q.json python docs/results/cpu/row_logits/ab.py

The first turn of QUESTIONS (1) Spec-Bench questions per group, chat template, 128 new
tokens, REPS (2) passes over the prompts, the order of the decoders rotating per prompt;
after an untimed 8-token generation of every prompt by every decoder (compiling every
prompt bucket). Tokens/s over whole calls, the prefill included. Prints, per prompt, whether
each decoder's tokens equal plain decoding's of the same setting (transformers' against the
row-at-a-time plain decoding)."""
import json
import os
import time

import clasp_jax
from clasp_jax import strategies
from clasp_jax.bench import hf_reference, specbench

HERE = os.path.dirname(os.path.abspath(__file__))
QUESTIONS = os.path.join(HERE, '../../../../../shared/data/spec_bench/question.jsonl')

model = clasp_jax.load()
qs = specbench.load_questions(QUESTIONS, int(os.environ.get('QUESTIONS', 1)))
prompts = [clasp_jax.encode_prompt(model, q['turns'][0], chat=True) for q in qs]
runs = {'transformers': hf_reference.load_reference(model).generate}
for by_row in (True, False):
  for method in ('vanilla', 'clasp'):
    runs[f'{method} by_row={by_row}'] = clasp_jax.Decoder(
        model.params, model.config, strategies.build(method, model.config),
        logits_by_row=by_row).generate
reference = {'transformers': 'vanilla by_row=True'}
reference.update({k: 'vanilla ' + k.split()[1] for k in runs if k != 'transformers'})
for generate in runs.values():
  for p in prompts:
    generate(p, 8)
totals = {k: [0.0, 0] for k in runs}
names = list(runs)
for rep in range(int(os.environ.get('REPS', 2))):
  for i, p in enumerate(prompts):
    shift = (rep * len(prompts) + i) % len(names)
    tokens = {}
    for k in names[shift:] + names[:shift]:
      start = time.perf_counter()
      tokens[k] = list(runs[k](p, 128).token_ids)
      totals[k][0] += time.perf_counter() - start
      totals[k][1] += len(tokens[k])
    print(rep, i, len(p), {k: tokens[k] == tokens[reference[k]] for k in names}, flush=True)
base = totals['transformers'][1] / totals['transformers'][0]
for k, (seconds, n) in totals.items():
  print(f'{k:24s} {n / seconds:7.2f} tok/s  {n / seconds / base:5.3f}x transformers', flush=True)
with open(os.path.join(HERE, os.environ.get('OUT', 'ab.json')), 'w') as f:
  json.dump({k: dict(seconds=s, tokens=n) for k, (s, n) in totals.items()}, f, indent=1)
