r"""Drafting methods at several (pass width, K, layer layout) settings, beside plain decoding
and transformers' greedy `generate`: the embedded SmolLM2-135M-Instruct, float32.

  python docs/results/cpu/pass_width/width_k.py          # from the repository root
  DECODERS=vanilla_w1=vanilla:1:8:auto,vanilla_w9=vanilla:9:8:auto,\
vanilla_w3_pl=vanilla:3:2:pl,clasp_w9k8=clasp:9:8:auto,clasp_w3k2=clasp:3:2:stacked,\
clasp_w3k2_pl=clasp:3:2:pl,clasp_w2k1_pl=clasp:2:1:pl python docs/results/cpu/pass_width/width_k.py

The first ran on commit 82170e2 (width_k.txt), the second on 9304cdd (width_k2.txt; it ran as a
copy of this script with that list written in, merged here afterwards). $DECODERS lists
name=method:width:K:layout, the layout `auto` (the decoder's default for its width), `stacked`
or `pl` (per-layer buffers); unset, plain decoding at width 1 and, for the default method
(`clasp`: prompt lookup first, M chosen online) and prompt lookup, width 9 with K = 8 (the
CPU's defaults), width 3 with K = 2 and width 5 with K = 4 on per-layer buffers.

One Spec-Bench question per group ($SPEC_GROUPS, comma-separated; unset: all six), its first
turn in the chat template, 128 new tokens, after a
warm-up of 8 tokens per prompt and decoder; the decoders take turns per prompt, the order
rotated; tokens/s over whole calls, the prefill included.
"""
import os, time
import clasp_jax
from clasp_jax import strategies
from clasp_jax.bench import hf_reference, specbench
model = clasp_jax.load()
groups = os.environ.get('SPEC_GROUPS')
qs = specbench.load_questions('../shared/data/spec_bench/question.jsonl', 1,
                              groups.split(',') if groups else None)
prompts = [clasp_jax.encode_prompt(model, q['turns'][0], chat=True) for q in qs]
runs = {'hf': hf_reference.load_reference(model).generate}
def dec(method, w, k, fast):
  return clasp_jax.Decoder(model.params, model.config, strategies.build(method, model.config, num_draft_tokens=k), pass_width=w, fast_path=fast).generate
DEFAULT = ','.join(['vanilla_w1=vanilla:1:8:auto'] + [
    f'{m}_w{w}k{k}{tail}={m}:{w}:{k}:{layout}' for m in ('clasp', 'pld')
    for w, k, tail, layout in ((9, 8, '', 'auto'), (3, 2, '_pl', 'pl'), (5, 4, '_pl', 'pl'))])
LAYOUTS = {'auto': None, 'stacked': False, 'pl': True}
for spec in os.environ.get('DECODERS', DEFAULT).split(','):
  name, setting = spec.split('=')
  method, w, k, layout = setting.split(':')
  runs[name] = dec(method, int(w), int(k), LAYOUTS[layout])
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
