"""The default method (`clasp`: prompt lookup first, M chosen online) and prompt lookup at
three (pass width, K, layer layout) settings, beside plain decoding at width 1 and
transformers' greedy `generate`: the embedded SmolLM2-135M-Instruct, float32.

  python docs/results/cpu/pass_width/width_k.py     # from the repository root; width_k.txt

Settings: width 9 with K = 8 and the stacked layout (the CPU's defaults), width 3 with K = 2
and width 5 with K = 4, both on per-layer buffers (`_pl`). One Spec-Bench question per group
(its first turn, chat template), 128 new tokens, after a warm-up of 8 tokens per prompt and
decoder; the decoders take turns per prompt, the order rotated; tokens/s over whole calls,
the prefill included.
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
for method in os.environ.get('METHODS', 'clasp,pld').split(','):
  runs[f'{method}_w9k8'] = dec(method, 9, 8, None)
  runs[f'{method}_w3k2_pl'] = dec(method, 3, 2, True)
  runs[f'{method}_w5k4_pl'] = dec(method, 5, 4, True)
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
