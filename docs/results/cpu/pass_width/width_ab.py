"""Methods at pass widths 16 and 9 (K + 1 for the default K = 8), or those of $WIDTHS, beside
transformers' greedy `generate`, taking turns per prompt.

  python docs/results/cpu/pass_width/width_ab.py                        # width_ab.json
  METHODS=vanilla,clasp OUT=width_ab_clasp.json python docs/results/cpu/pass_width/width_ab.py
  WIDTHS=9,1 METHODS=hf,vanilla,clasp OUT=width_1.json \
      python docs/results/cpu/pass_width/width_ab.py

One Spec-Bench question per group (its first turn, chat template), 128 new tokens, after a
warm-up generation of 8 tokens per prompt and method; tokens/s over the whole calls (the
prefill included); ratios against the first method. Writes $OUT (width_ab.json) beside this
script."""
import json, os, time
import clasp_jax
from clasp_jax import strategies
from clasp_jax.bench import hf_reference, specbench

model = clasp_jax.load()
HERE = os.path.dirname(os.path.abspath(__file__))
qs = specbench.load_questions(os.path.join(HERE, '../../../../../shared/data/spec_bench/question.jsonl'), 1)
prompts = [clasp_jax.encode_prompt(model, q['turns'][0], chat=True) for q in qs]
METHODS = os.environ.get('METHODS', 'hf,vanilla,pld').split(',')
runs = {'hf': hf_reference.load_reference(model).generate} if 'hf' in METHODS else {}
for w in (int(w) for w in os.environ.get('WIDTHS', '16,9').split(',')):
  for name in METHODS:
    if name != 'hf':
      runs[f'{name}_w{w}'] = clasp_jax.Decoder(model.params, model.config,
                                               strategies.build(name, model.config),
                                               pass_width=w).generate
for gen in runs.values():  # warm-up: compiles every bucket these prompts use
  for p in prompts:
    gen(p, 8)
tot = {k: [0.0, 0] for k in runs}
toks = {}
names = list(runs)
for i, p in enumerate(prompts):
  order = names[i % len(names):] + names[:i % len(names)]
  for k in order:
    t0 = time.perf_counter(); g = runs[k](p, 128); dt = time.perf_counter() - t0
    tot[k][0] += dt; tot[k][1] += len(g.token_ids); toks[(k, i)] = list(g.token_ids)
  print(i, len(p), {k: toks[(k, i)] == toks[(names[0], i)] for k in names}, flush=True)
for k, (s, n) in tot.items():
  print(k, round(n / s, 2), 'tok/s', round((n / s) / (tot[names[0]][1] / tot[names[0]][0]), 3),
        'x', names[0])
json.dump({k: dict(seconds=s, tokens=n) for k, (s, n) in tot.items()}, open(os.path.join(HERE, os.environ.get('OUT', 'width_ab.json')), 'w'))
