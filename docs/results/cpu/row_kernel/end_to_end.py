r"""The CPU product kernel end to end: each method at the CPU's defaults (width 3, K = 2) with
the kernel's products and with XLA's, beside plain decoding at width 1 and transformers'
greedy `generate`: the embedded SmolLM2-135M-Instruct, float32.

  python docs/results/cpu/row_kernel/end_to_end.py      # from the repository root

$PER_GROUP Spec-Bench questions per group (unset: 1), their first turns in the chat template,
128 new tokens, after a warm-up of 8 tokens per prompt and decoder; the decoders take turns per
prompt, the order rotated; tokens/s over whole calls (the prefill included). Each prompt's line
says whether every decoder's tokens equal transformers'. Shows what a user gets from the kernel
(`Decoder(cpu_kernel=...)`); not where a pass's time goes (`steps.py`).
"""
import os, time
import clasp_jax
from clasp_jax import strategies
from clasp_jax.bench import hf_reference, specbench
model = clasp_jax.load()
qs = specbench.load_questions('../shared/data/spec_bench/question.jsonl',
                              int(os.environ.get('PER_GROUP', 1)))
prompts = [clasp_jax.encode_prompt(model, q['turns'][0], chat=True) for q in qs]
runs = {'hf': hf_reference.load_reference(model).generate}
DECODERS = {'vanilla_w1': ('vanilla', 1, None)} | {
    f'{method}_w3_{name}': (method, 3, on) for method in ('vanilla', 'clasp', 'pld')
    for name, on in (('xla', False), ('kernel', True))}
for name, (method, width, on) in DECODERS.items():
  runs[name] = clasp_jax.Decoder(model.params, model.config,
                                 strategies.build(method, model.config, pass_width=width),
                                 pass_width=width, cpu_kernel=on).generate
for generate in runs.values():
  for p in prompts:
    generate(p, 8)
totals = {name: [0.0, 0] for name in runs}
names = list(runs)
for i, p in enumerate(prompts):
  tokens = {}
  for name in names[i % len(names):] + names[:i % len(names)]:
    start = time.perf_counter(); out = runs[name](p, 128); seconds = time.perf_counter() - start
    totals[name][0] += seconds; totals[name][1] += len(out.token_ids)
    tokens[name] = list(out.token_ids)
  print(i, len(p), 'tokens', 'all equal to hf:', all(t == tokens['hf'] for t in tokens.values()),
        flush=True)
hf = totals['hf'][1] / totals['hf'][0]
for name, (seconds, count) in totals.items():
  print(f'{name:16s} {count / seconds:6.2f} tok/s {count / seconds / hf:5.3f}x hf')
