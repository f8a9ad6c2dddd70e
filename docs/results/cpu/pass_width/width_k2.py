"""A second table beside `width_k.py`'s: plain decoding at widths 1, 9 (stacked) and 3
(per-layer buffers), and the default method (`clasp`) at width 9 with K = 8 (the CPU's
defaults), width 3 with K = 2 stacked and on per-layer buffers (`_pl`), and width 2 with K = 1
on per-layer buffers, beside transformers' greedy `generate`. Otherwise as `width_k.py`.

  python docs/results/cpu/pass_width/width_k2.py    # from the repository root; width_k2.txt
"""
import os, time
import clasp_jax
from clasp_jax import strategies
from clasp_jax.bench import hf_reference, specbench
model = clasp_jax.load()
qs = specbench.load_questions('../shared/data/spec_bench/question.jsonl', 1)
prompts = [clasp_jax.encode_prompt(model, q['turns'][0], chat=True) for q in qs]
runs = {'hf': hf_reference.load_reference(model).generate}
def dec(method, w, k, fast):
  return clasp_jax.Decoder(model.params, model.config, strategies.build(method, model.config, num_draft_tokens=k), pass_width=w, fast_path=fast).generate
runs['vanilla_w1'] = dec('vanilla', 1, 8, None)
runs['vanilla_w9'] = dec('vanilla', 9, 8, None)
runs['vanilla_w3_pl'] = dec('vanilla', 3, 2, True)
runs['clasp_w9k8'] = dec('clasp', 9, 8, None)
runs['clasp_w3k2'] = dec('clasp', 3, 2, False)
runs['clasp_w3k2_pl'] = dec('clasp', 3, 2, True)
runs['clasp_w2k1_pl'] = dec('clasp', 2, 1, True)
for k, gen in runs.items():
  t = time.perf_counter()
  for p in prompts:
    gen(p, 8)
  print('warm', k, round(time.perf_counter() - t), 's', flush=True)
tot = {k: [0.0, 0] for k in runs}
names = list(runs)
for i, p in enumerate(prompts):
  order = names[i % len(names):] + names[:i % len(names)]
  toks = {}
  for k in order:
    t0 = time.perf_counter(); g = runs[k](p, 128); dt = time.perf_counter() - t0
    tot[k][0] += dt; tot[k][1] += len(g.token_ids); toks[k] = list(g.token_ids)
  print(i, len(p), 'same as hf:', {k: toks[k] == toks['hf'] for k in names}, flush=True)
for k, (s, n) in tot.items():
  print(f'{k:16s} {n / s:6.2f} tok/s {(n / s) / (tot["hf"][1] / tot["hf"][0]):5.3f}x hf', flush=True)
