r"""Plain decoding at width 1 beside the CPU's defaults (width 3, K = 2: the default method,
prompt lookup and plain decoding), per Spec-Bench group: the embedded SmolLM2-135M-Instruct,
float32.

  python docs/results/cpu/pass_width/by_group.py      # by_group.txt

$PER_GROUP questions per group (unset: 2), their first turns in the chat template, 128 new
tokens, after a warm-up of 8 tokens per prompt and decoder; the decoders take turns per
prompt, the order rotated; tokens/s over whole calls (the prefill included), per group and
over all. Shows where, if anywhere, drafting at the default width beats plain decoding at
width 1 on this machine; not whether their tokens agree (they need not: two widths).
"""
import collections, os, time
import clasp_jax
from clasp_jax import strategies
from clasp_jax.bench import specbench
model = clasp_jax.load()
qs = specbench.load_questions('../shared/data/spec_bench/question.jsonl',
                              int(os.environ.get('PER_GROUP', 2)))
prompts = [(specbench.group_of(q['category']), clasp_jax.encode_prompt(model, q['turns'][0], chat=True))
           for q in qs]
DECODERS = {'vanilla_w1': ('vanilla', 1), 'clasp_w3': ('clasp', 3), 'pld_w3': ('pld', 3),
            'vanilla_w3': ('vanilla', 3)}
runs = {name: clasp_jax.Decoder(model.params, model.config,
                                strategies.build(method, model.config, pass_width=width),
                                pass_width=width).generate
        for name, (method, width) in DECODERS.items()}
for generate in runs.values():
  for _, p in prompts:
    generate(p, 8)
totals = collections.defaultdict(lambda: [0.0, 0])  # (group, decoder) -> [seconds, tokens]
names = list(runs)
for i, (group, p) in enumerate(prompts):
  for name in names[i % len(names):] + names[:i % len(names)]:
    start = time.perf_counter(); out = runs[name](p, 128); seconds = time.perf_counter() - start
    for key in ((group, name), ('all', name)):
      totals[key][0] += seconds; totals[key][1] += len(out.token_ids)
groups = list(dict.fromkeys(g for g, _ in prompts)) + ['all']
print('| group | ' + ' | '.join(names) + ' |\n|---|' + '---:|' * len(names))
for g in groups:
  print(f'| {g} | ' + ' | '.join(f'{totals[(g, n)][1] / totals[(g, n)][0]:.2f}' for n in names) + ' |')
