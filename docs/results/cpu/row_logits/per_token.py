"""Plain decoding per token: width 9 with logits by row (the CPU default now) and with the
pass's logits, width 1, and transformers' generate, in turns on two Spec-Bench prompts."""
import statistics
import clasp_jax
from clasp_jax import strategies
from clasp_jax.bench import hf_reference, specbench
model = clasp_jax.load()
qs = specbench.load_questions('../shared/data/spec_bench/question.jsonl', 1)
ps = [clasp_jax.encode_prompt(model, qs[i]['turns'][0], chat=True) for i in (0, 2)]
V = strategies.Vanilla
gens = {'width 9, by row': clasp_jax.Decoder(model.params, model.config, V()).generate,
        'width 9, pass logits': clasp_jax.Decoder(model.params, model.config, V(), logits_by_row=False).generate,
        'width 1': clasp_jax.Decoder(model.params, model.config, V(), pass_width=1).generate,
        'transformers': hf_reference.load_reference(model).generate}
for p in ps:
  for g in gens.values():
    g(p, 8); g(p, 1)
  res = {n: [] for n in gens}; pre = {n: [] for n in gens}
  for rep in range(3):
    for n, g in gens.items():
      one = g(p, 1).wall_time
      full = g(p, 48)
      pre[n].append(one)
      res[n].append((full.wall_time - one) / (full.new_tokens - 1))
  for n, r in res.items():
    print(len(p), '%-22s' % n, '%.1f ms/token' % (1e3 * statistics.median(r)), 'prefill+1 %.2f s' % statistics.median(pre[n]), ['%.1f' % (1e3 * x) for x in r], flush=True)
