"""Plain decoding at width 1 on each layer layout, beside width 9 and transformers' greedy
`generate`, taking turns per prompt.

  python docs/results/cpu/width_1_per_layer/ab.py          # ab.json, printed lines in ab.txt

Decoders (all plain decoding of the embedded SmolLM2-135M-Instruct, float32):
  stacked_w1   width 1 on the stacked layout (`fast_path=False`): the default at width 1 before
               this folder's commit;
  per_layer_w1_no_ra  width 1 on per-layer buffers, compiled without copy insertion's region
               analysis (how `fast_path=True` compiled before);
  per_layer_w1 width 1 on per-layer buffers with it: the default at width 1 now;
  stacked_w9   the CPU's default width (unchanged).
One Spec-Bench question per group (its first turn, chat template; $NQ groups, default 6), 128
new tokens, after a warm-up generation of 8 tokens per prompt and decoder; tokens/s over the
whole calls (the prefill included); ratios against transformers. Writes ab.json beside this
script.
"""
import json, os, time
import clasp_jax
from clasp_jax import strategies, xla_options
from clasp_jax.bench import hf_reference, specbench

model = clasp_jax.load()
HERE = os.path.dirname(os.path.abspath(__file__))
qs = specbench.load_questions(os.path.join(HERE, '../../../../../shared/data/spec_bench/question.jsonl'), 1)
prompts = [clasp_jax.encode_prompt(model, q['turns'][0], chat=True) for q in qs][:int(os.environ.get('NQ', 6))]


def plain(width, fast_path):
  return clasp_jax.Decoder(model.params, model.config, strategies.Vanilla(), pass_width=width,
                           fast_path=fast_path).generate


runs = {'hf': hf_reference.load_reference(model).generate, 'stacked_w1': plain(1, False)}
with_ra, xla_options.CPU_PER_LAYER_OPTIONS = (xla_options.CPU_PER_LAYER_OPTIONS,
                                              xla_options.CPU_COMPILER_OPTIONS)
runs['per_layer_w1_no_ra'] = plain(1, True)  # options are read when a decoder is built
xla_options.CPU_PER_LAYER_OPTIONS = with_ra
runs['per_layer_w1'] = plain(1, None)
runs['stacked_w9'] = plain(None, None)
for gen in runs.values():  # warm-up: compiles every bucket these prompts use
  for p in prompts:
    gen(p, 8)
tot = {k: [0.0, 0] for k in runs}
names = list(runs)
for i, p in enumerate(prompts):
  order = names[i % len(names):] + names[:i % len(names)]
  toks, ms = {}, {}
  for k in order:
    t0 = time.perf_counter(); g = runs[k](p, 128); dt = time.perf_counter() - t0
    tot[k][0] += dt; tot[k][1] += len(g.token_ids); toks[k] = list(g.token_ids)
    ms[k] = round(1000 * dt / len(g.token_ids), 1)
  print(i, len(p), 'identical:', all(toks[k] == toks['hf'] for k in names), 'ms/token:', ms,
        flush=True)
base = tot['hf'][1] / tot['hf'][0]
for k, (s, n) in tot.items():
  print(f'{k:20s} {n / s:6.2f} tok/s {n / s / base:6.3f}x hf')
json.dump({k: dict(seconds=s, tokens=n) for k, (s, n) in tot.items()},
          open(os.path.join(HERE, 'ab.json'), 'w'), indent=1)
