"""The CPU cache attention before and after this folder's commit, side by side in one process:
plain decoding of the embedded SmolLM2-135M-Instruct (float32) at width 1 and at the default
width (9), beside transformers' greedy `generate`.

  python docs/results/cpu/cache_attention/ab.py     # printed lines: ab.txt; ab.json

"before" decoders are built with the two changes undone in this process (their programs are
compiled while undone): every chunk through the batched path (`attention._chunk_attention`),
and every reduction over a block's keys as one `op(x, axis=-1)`. Prompts: the first
Spec-Bench question of each group whose prompt is longer than 500 tokens (two of them), and the
first question's (53 tokens). Per prompt and decoder, in turns: `generate` for 1 token (median
of 3: the prefill and the first token), then for 128 tokens; the time after the first token
over the tokens after it.
"""
import json, os, time
import numpy as np
import clasp_jax
from clasp_jax import attention, strategies
from clasp_jax.bench import hf_reference, specbench

HERE = os.path.dirname(os.path.abspath(__file__))
model = clasp_jax.load()  # stacked, as width 9 runs it; width 1 makes its per-layer copy
qs = specbench.load_questions(os.path.join(HERE, '../../../../../shared/data/spec_bench/question.jsonl'), 1)
prompts = [clasp_jax.encode_prompt(model, q['turns'][0], chat=True) for q in qs]
prompts = [p for p in prompts if len(p) > 500][:2] + [prompts[0]]
new_paths = (attention._row_attention, attention._reduce_keys)


def decoder(width, before):
  """A warm plain decoder, compiled with the attention as it was (`before`) or as it is."""
  if before:
    attention._row_attention = attention._chunk_attention
    attention._reduce_keys = lambda op, x: op(x, axis=-1)
  d = clasp_jax.Decoder(model.params, model.config, strategies.Vanilla(), pass_width=width)
  for p in prompts:  # compiles every bucket these prompts use
    d.generate(p, 8)
  attention._row_attention, attention._reduce_keys = new_paths
  return d.generate


runs = {'hf': hf_reference.load_reference(model).generate}
for width in (1, None):
  for before in (True, False):
    runs[f'{"before" if before else "after"}_w{width or 9}'] = decoder(width, before)
for gen in runs.values():
  gen(prompts[0], 8)
rows = []
for p in prompts:
  out, toks = {}, {}
  for k, gen in runs.items():
    firsts = []
    for _ in range(3):
      t = time.perf_counter(); gen(p, 1); firsts.append(time.perf_counter() - t)
    t = time.perf_counter(); g = gen(p, 128); total = time.perf_counter() - t
    n, first = len(g.token_ids), float(np.median(firsts))
    toks[k] = list(g.token_ids)
    out[k] = dict(first_ms=round(1000 * first), then_ms=round((total - first) * 1000 / (n - 1), 1),
                  tokens=n, total_s=round(total, 3))
  same = {k: toks[k] == toks['hf'] for k in runs}
  rows.append(dict(prompt_tokens=len(p), identical_to_hf=same, **out))
  print(len(p), 'identical to hf:', same, flush=True)
  for k, v in out.items():
    print(f'  {k:10s} first token {v["first_ms"]:5d} ms, then {v["then_ms"]:5.1f} ms a token '
          f'({v["tokens"]} tokens, {v["total_s"]:.2f} s)', flush=True)
json.dump(rows, open(os.path.join(HERE, 'ab.json'), 'w'), indent=1)
