"""Plain decoding of the embedded SmolLM2-135M-Instruct (float32) on the CPU, its programs
compiled with YNNPACK's fusions off (`xla_options.CPU_COMPILER_OPTIONS`) and with XLA's defaults:
two decoders in one process, timed in turns on a short and a long Spec-Bench prompt.

  python docs/results/cpu/ynn_fusions/ab.py

A generation of 1 new token is taken as the prefill; the per-token time is the rest of a
64-token generation over its 63 further tokens; medians of 3 turns after a warm-up.
"""
import os
import statistics
import clasp_jax
from clasp_jax import strategies, xla_options
from clasp_jax.bench import specbench
model = clasp_jax.load()
QUESTIONS = os.path.join(os.path.dirname(__file__), '../../../../../shared/data/spec_bench/'
                         'question.jsonl')
qs = specbench.load_questions(QUESTIONS, 1)
prompts = [  # mt_bench and summarization: a short and a long prompt
    clasp_jax.encode_prompt(model, qs[i]['turns'][0], chat=True) for i in (0, 2)]
decs = {}
for name, opts in (('ynn_off', xla_options.CPU_COMPILER_OPTIONS), ('default', None)):
  xla_options.CPU_COMPILER_OPTIONS = opts  # read when a decoder is built
  d = clasp_jax.Decoder(model.params, model.config, strategies.Vanilla())
  for p in prompts:
    d.generate(p, 8); d.generate(p, 1)
  decs[name] = d
res = {(n, len(p)): {'pre': [], 'tok': []} for n in decs for p in prompts}
for rep in range(3):
  for p in prompts:
    for n, d in decs.items():
      pre = d.generate(p, 1).wall_time
      full = d.generate(p, 64)
      res[(n, len(p))]['pre'].append(pre)
      res[(n, len(p))]['tok'].append((full.wall_time - pre) / (full.new_tokens - 1))
for (n, l), r in res.items():
  print(n, l, 'prefill %.3f s' % statistics.median(r['pre']), '%.1f ms/token' % (1e3 * statistics.median(r['tok'])), flush=True)
