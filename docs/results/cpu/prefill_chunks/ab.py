"""The prefill on a CPU as one pass over the prompt's bucket against passes of 128 and 256
tokens (`engine.CPU_PREFILL_CHUNK`), beside transformers, taking turns per prompt.

  python docs/results/cpu/prefill_chunks/ab.py      # writes ab.json beside this script

The first turn of one Spec-Bench question per group (chat template): seconds of a 1-token
generation (the prefill and its first token, no round), median of REPS (5) turns after an
untimed one; whether each first token equals the one-pass prefill's."""
import json
import os
import statistics
import time

import clasp_jax
from clasp_jax import engine
from clasp_jax import strategies
from clasp_jax.bench import hf_reference, specbench

HERE = os.path.dirname(os.path.abspath(__file__))
QUESTIONS = os.path.join(HERE, '../../../../../shared/data/spec_bench/question.jsonl')

model = clasp_jax.load()
prompts = [clasp_jax.encode_prompt(model, q['turns'][0], chat=True)
           for q in specbench.load_questions(QUESTIONS, 1)]
runs = {'transformers': hf_reference.load_reference(model).generate}
for chunk in (None, 256, 128):
  engine.CPU_PREFILL_CHUNK = chunk  # read when a decoder is made
  runs[f'chunk={chunk}'] = clasp_jax.Decoder(model.params, model.config,
                                             strategies.Vanilla()).generate
rows = []
for p in prompts:
  first = {k: run(p, 1).token_ids for k, run in runs.items()}
  seconds = {k: [] for k in runs}
  for _ in range(int(os.environ.get('REPS', 5))):
    for k, run in runs.items():
      start = time.perf_counter()
      run(p, 1)
      seconds[k].append(time.perf_counter() - start)
  rows.append(dict(prompt_tokens=len(p),
                   seconds={k: statistics.median(v) for k, v in seconds.items()},
                   same_first_token={k: first[k] == first['chunk=None'] for k in runs}))
  print(len(p), {k: round(v, 3) for k, v in rows[-1]['seconds'].items()},
        rows[-1]['same_first_token'], flush=True)
with open(os.path.join(HERE, 'ab.json'), 'w') as f:
  json.dump(rows, f, indent=1)
