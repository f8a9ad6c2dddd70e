"""Plain decoding of a real model on Spec-Bench prompts through `Decoder.generate`, the prompt's
one-pass prefill through cuDNN's fused attention (`attention.prompt_attention`, the GPU's
default since this change) against the cache attention (the engine before it: the
resolver patched to None while the second decoder is built), in turns in one process.

  python docs/results/h200/prompt_attention/specbench_ab.py <model.gguf> <question.jsonl> OUT.json

Per question and decoder: the time to the first token (a 1-token generation) and a 256-token
generation, median of 3 turns after an untimed one; the tokens of the two decoders compared.
"""
import json
import statistics
import sys

import jax

import clasp_jax
from clasp_jax import engine, strategies
from clasp_jax.bench import specbench

NEW, TURNS = 256, 3
model_path, questions_path, out_path = sys.argv[1:4]
model = clasp_jax.load(model_path)
questions = specbench.load_questions(questions_path, 2)
prompts = [clasp_jax.encode_prompt(model, q['turns'][0], chat=True) for q in questions]
decoders = {'cudnn': clasp_jax.Decoder(model.params, model.config, strategies.Vanilla())}
resolve = engine.resolve_prompt_attention
engine.resolve_prompt_attention = lambda *args: None
decoders['cache_attention'] = clasp_jax.Decoder(model.params, model.config, strategies.Vanilla())
engine.resolve_prompt_attention = resolve

for decoder in decoders.values():  # compiles every prompt bucket
  for prompt in prompts:
    decoder.generate(prompt, 1)
    decoder.generate(prompt, NEW)
rows = []
for q, prompt in zip(questions, prompts):
  times = {name: ([], []) for name in decoders}
  tokens = {}
  for _ in range(TURNS):
    for name, decoder in decoders.items():
      first, full = decoder.generate(prompt, 1), decoder.generate(prompt, NEW)
      times[name][0].append(first.wall_time)
      times[name][1].append(full.wall_time)
      tokens[name] = full.token_ids
  row = dict(category=q['category'], prompt_tokens=len(prompt),
             new_tokens={n: len(t) for n, t in tokens.items()},
             same_tokens=tokens['cudnn'] == tokens['cache_attention'])
  for name, (first, full) in times.items():
    row[name] = dict(first_token_s=statistics.median(first), generate_s=statistics.median(full))
  rows.append(row)
  print(json.dumps(row), flush=True)

summary = {name: dict(
    tokens_per_s=(sum(r['new_tokens'][name] for r in rows)
                  / sum(r[name]['generate_s'] for r in rows)),
    median_first_token_ms=1e3 * statistics.median(r[name]['first_token_s'] for r in rows))
           for name in decoders}
summary['identical'] = f"{sum(r['same_tokens'] for r in rows)}/{len(rows)}"
print(json.dumps(summary, indent=1))
with open(out_path, 'w') as f:
  json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, new_tokens=NEW,
                 turns=TURNS, rows=rows, summary=summary), f, indent=1)
