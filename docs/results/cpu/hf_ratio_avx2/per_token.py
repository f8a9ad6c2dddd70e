"""Prefill and per-token decode time of plain decoding on the CPU: ours at pass widths 16 (the
default) and 1, and transformers' greedy `generate`, on the same Spec-Bench prompts.

  python docs/results/cpu/hf_ratio_avx2/per_token.py

A generation's time at 1 new token is taken as its prefill; the per-token time is the rest of
a 64-token generation over its 63 further tokens (best of two runs each, after a warm-up). The
width-1 decoder is for this measurement only: decoders compare exactly at the same width, and
every method of the library runs at 16 (see engine.py).
"""

import json
import os

import clasp_jax
from clasp_jax import strategies
from clasp_jax.bench import hf_reference
from clasp_jax.bench import specbench

QUESTIONS = os.path.join(os.path.dirname(__file__), '../../../../../shared/data/spec_bench/'
                         'question.jsonl')
NEW = 64


def split(generate, prompt):
  """(prefill seconds, seconds per further token, new tokens) of greedy decoding."""
  generate(prompt, 8)
  full = min((generate(prompt, NEW) for _ in range(2)), key=lambda g: g.wall_time)
  prefill = min(generate(prompt, 1).wall_time for _ in range(2))
  return prefill, (full.wall_time - prefill) / (full.new_tokens - 1), full.new_tokens


def main():
  model = clasp_jax.load()
  questions = specbench.load_questions(QUESTIONS, 1)
  prompts = [clasp_jax.encode_prompt(model, questions[i]['turns'][0], chat=True)
             for i in (0, 2)]  # mt_bench, summarization: a short and a long prompt
  runs = {f'ours, width {w}': clasp_jax.Decoder(model.params, model.config,
                                                strategies.Vanilla(), pass_width=w).generate
          for w in (16, 1)}
  runs['transformers'] = hf_reference.load_reference(model).generate
  rows = []
  for name, generate in runs.items():
    for prompt in prompts:
      prefill, per_token, new = split(generate, prompt)
      rows.append(dict(method=name, prompt_tokens=len(prompt), new_tokens=new,
                       prefill_s=round(prefill, 3), ms_per_token=round(1e3 * per_token, 1)))
      print(json.dumps(rows[-1]), flush=True)


if __name__ == '__main__':
  main()
