r"""Plain steps at one row inside the CPU's 3-row decoders (`Decoder(rows_apart=...)`), end to
end: each method at the CPU's defaults (width 3, K = 2) with rows apart (the default now: plain
steps 1 row wide) and without (plain steps 3 rows wide, as before), beside transformers'
greedy `generate`: the embedded SmolLM2-135M-Instruct, float32.

  python docs/results/cpu/plain_one_row/end_to_end.py      # from the repository root

$PER_GROUP Spec-Bench questions per group (unset: 1), their first turns in the chat template,
128 new tokens, after a warm-up of 8 tokens per prompt and decoder; the decoders take turns per
prompt, the order rotated; tokens/s over whole calls (the prefill included). Each prompt's line
says whether every decoder's tokens equal transformers'.
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
for method in ('vanilla', 'clasp', 'pld'):
  for name, apart in (('apart', None), ('3_rows', False)):
    decoder = clasp_jax.Decoder(model.params, model.config,
                                strategies.build(method, model.config), rows_apart=apart)
    assert decoder.rows_apart == (apart is None)
    runs[f'{method}_{name}'] = decoder.generate
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
