"""The prefill apart from the steps after it: plain decoding at width 1 (the default layout,
per layer) and transformers' greedy `generate`, on the two Spec-Bench prompts of the first
question per group longer than 500 tokens and on the first question's.

  python docs/results/cpu/width_1_per_layer/first_token.py     # printed lines: first_token.txt

Per prompt and decoder: `generate` for 1 token (median of 3: the prefill and the first
token), then for 128, and the time after the first token divided by the tokens after it.
"""
import os, time
import numpy as np
import clasp_jax
from clasp_jax import strategies
from clasp_jax.bench import hf_reference, specbench

model = clasp_jax.load()
HERE = os.path.dirname(os.path.abspath(__file__))
qs = specbench.load_questions(os.path.join(HERE, '../../../../../shared/data/spec_bench/question.jsonl'), 1)
prompts = [clasp_jax.encode_prompt(model, q['turns'][0], chat=True) for q in qs]
prompts = [p for p in prompts if len(p) > 500][:2] + [prompts[0]]
runs = {'hf': hf_reference.load_reference(model).generate,
        'per_layer_w1': clasp_jax.Decoder(model.params, model.config, strategies.Vanilla(),
                                          pass_width=1).generate}
for gen in runs.values():  # warm-up: compiles every bucket these prompts use
  for p in prompts:
    gen(p, 8)
for p in prompts:
  out = {}
  for k, gen in runs.items():
    firsts = []
    for _ in range(3):
      t = time.perf_counter(); gen(p, 1); firsts.append(time.perf_counter() - t)
    t = time.perf_counter(); g = gen(p, 128); total = time.perf_counter() - t
    n, first = len(g.token_ids), float(np.median(firsts))
    out[k] = (f'first token {1000 * first:6.0f} ms, then {(total - first) * 1000 / (n - 1):5.1f} '
              f'ms a token ({n} tokens)')
  print(len(p), out, flush=True)
