"""Plain decoding at BASE (the commit before this change) and with it, in one process, in
turns with transformers' greedy `generate`.

  BASE=f6e67e5 python docs/results/cpu/prefill_tail/ab.py     # from the repository root

BASE's `_prefill` and `attention.py` are read with `git show` and patched in while its decoder
compiles its programs (every prompt's bucket, in an untimed 8-token generation), so both
decoders share everything else. First the prefill: 1-token generations, median of 5 turns
per prompt. Then REPS (2) passes of NEW (128)-token generations over one Spec-Bench question
per group, the order rotating per prompt; tokens/s over whole calls, the prefill included.
Prints whether each run's tokens equal BASE's."""
import os
import statistics
import subprocess
import sys
import time
import types

import clasp_jax
from clasp_jax import attention as attention_lib
from clasp_jax import engine, strategies
from clasp_jax.bench import hf_reference, specbench

BASE = os.environ.get('BASE', 'f6e67e5')
NEW = int(os.environ.get('NEW', 128))


def git_show(path):
  return subprocess.run(['git', 'show', f'{BASE}:{path}'], check=True, capture_output=True,
                        text=True).stdout


old_attention = sys.modules['old_attention'] = types.ModuleType('old_attention')
exec(git_show('clasp_jax/attention.py'), old_attention.__dict__)  # pylint: disable=exec-used
source = git_show('clasp_jax/engine.py')
source = source[source.index('def _prefill('):source.index('\ndef _round(')]
exec(source.replace('def _prefill(', 'def _prefill_base(', 1), engine.__dict__)  # pylint: disable=exec-used

model = clasp_jax.load()
questions = specbench.load_questions('../shared/data/spec_bench/question.jsonl', 1)
prompts = [clasp_jax.encode_prompt(model, q['turns'][0], chat=True) for q in questions]
new_prefill, new_attention = engine._prefill, attention_lib.cache_attention  # pylint: disable=protected-access
runs = {}
for name, base in (('base', True), ('this change', False)):
  engine._prefill = engine._prefill_base if base else new_prefill  # pylint: disable=protected-access
  attention_lib.cache_attention = old_attention.cache_attention if base else new_attention
  decoder = clasp_jax.Decoder(model.params, model.config, strategies.build('vanilla', model.config))
  for p in prompts:
    decoder.generate(p, 8)
  runs[name] = decoder.generate
engine._prefill, attention_lib.cache_attention = new_prefill, new_attention  # pylint: disable=protected-access
runs['transformers'] = hf_reference.load_reference(model).generate
for p in prompts:
  runs['transformers'](p, 2)
names = list(runs)

prefill = {(n, i): [] for n in names for i in range(len(prompts))}
for rep in range(5):
  for i, p in enumerate(prompts):
    for n in names[rep % 3:] + names[:rep % 3]:
      start = time.perf_counter()
      runs[n](p, 1)
      prefill[n, i].append(time.perf_counter() - start)
for i, p in enumerate(prompts):
  print(f'prefill of {len(p):4d} tokens, s:',
        '  '.join(f'{n} {statistics.median(prefill[n, i]):.3f}' for n in names), flush=True)

totals = {n: [0.0, 0] for n in names}
for rep in range(int(os.environ.get('REPS', 2))):
  for i, p in enumerate(prompts):
    tokens = {}
    for n in names[(rep + i) % 3:] + names[:(rep + i) % 3]:
      start = time.perf_counter()
      tokens[n] = list(runs[n](p, NEW).token_ids)
      totals[n][0] += time.perf_counter() - start
      totals[n][1] += len(tokens[n])
    print(rep, len(p), 'tokens equal to base:', {n: tokens[n] == tokens['base'] for n in names},
          flush=True)
rate = {n: count / seconds for n, (seconds, count) in totals.items()}
for n in names:
  print(f'{n:12s} {rate[n]:6.2f} tok/s  {rate[n] / rate["transformers"]:5.3f}x transformers',
        flush=True)
