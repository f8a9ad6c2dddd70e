"""Plain decoding at width 1 with the o and down products of a 1-row pass as one product
("before") and as two over the halves of K ("after", the library's CPU form), side by side in
one process, beside transformers' greedy `generate`: the embedded SmolLM2-135M-Instruct in
float32.

  python docs/results/cpu/row_products/ab.py     # printed lines: ab.txt; ab.json

The "before" decoder is compiled with `model._closing_product` replaced by the one product in
this process. Prompts: the first Spec-Bench question of the first group whose prompt is longer
than 500 tokens, and the first question's. Per prompt and rep, the decoders in turns (the order
reversed every other rep): `generate` for 1 token, then for 128; the time after the first
token over the tokens after it, the median of the reps.
"""
import json, os, time
import numpy as np
import clasp_jax
from clasp_jax import model as model_lib, strategies
from clasp_jax.bench import hf_reference, specbench

HERE = os.path.dirname(os.path.abspath(__file__))
REPS = 4
model = clasp_jax.load()
qs = specbench.load_questions(os.path.join(HERE, '../../../../../shared/data/spec_bench/question.jsonl'), 1)
prompts = [clasp_jax.encode_prompt(model, q['turns'][0], chat=True) for q in qs]
prompts = [p for p in prompts if len(p) > 500][:1] + [prompts[0]]
halves = model_lib._closing_product


def decoder(before):
  """A warm width-1 plain decoder compiled with one product (`before`) or the halves."""
  if before:
    model_lib._closing_product = lambda x, w: x @ w
  d = clasp_jax.Decoder(model.params, model.config, strategies.Vanilla(), pass_width=1)
  for p in prompts:  # compiles every bucket these prompts use
    d.generate(p, 8)
  model_lib._closing_product = halves
  return d.generate


runs = {'before': decoder(True), 'after': decoder(False),
        'hf': hf_reference.load_reference(model).generate}
rows = []
for p in prompts:
  ms, toks = {k: [] for k in runs}, {}
  for rep in range(REPS):
    for k, gen in (list(runs.items()) if rep % 2 == 0 else list(runs.items())[::-1]):
      t = time.perf_counter(); gen(p, 1); first = time.perf_counter() - t
      t = time.perf_counter(); g = gen(p, 128); total = time.perf_counter() - t
      ms[k].append((total - first) * 1000 / (len(g.token_ids) - 1))
      toks[k] = list(g.token_ids)
  same = {k: toks[k] == toks['hf'] for k in runs}
  med = {k: round(float(np.median(v)), 2) for k, v in ms.items()}
  rows.append(dict(prompt_tokens=len(p), identical_to_hf=same, ms_a_token=med,
                   ms_a_token_per_rep=ms))
  print(len(p), 'prompt tokens; ms a token after the first (median of', REPS, 'reps):', med,
        '; before/after:', round(med['before'] / med['after'], 3),
        '; hf/after:', round(med['hf'] / med['after'], 3), '; identical to hf:', same, flush=True)
json.dump(rows, open(os.path.join(HERE, 'ab.json'), 'w'), indent=1)
