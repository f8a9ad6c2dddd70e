"""Where a bf16 answer first leaves vanilla's: the float32 logit margin there (CPU).

For every first turn whose tokens differ from vanilla's, runs the embedded SmolLM2 in float32
over the prompt and vanilla's tokens before the first difference, and reports the logit of
vanilla's token minus that of the method's token at that position, and the larger of the two
logits. A margin far below bf16's resolution at that magnitude (about |logit| / 128) means
the two decodings parted at a near-tie that bf16 rounding decides, not at a drafting error.

  python docs/results/h100/specbench_bf16/near_ties.py   (from the repository root)
"""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from clasp_jax import model as model_lib
from clasp_jax import weights
from clasp_jax.bench.specbench import load_questions
from clasp_jax.cache import init_cache
from clasp_jax.generation import encode_prompt

HERE = Path(__file__).parent
METHODS = ('clasp', 'static', 'pld', 'conflayers')


def first_turns(method):
  return {r['question_id']: r['choices'][0]['token_ids'][0]
          for r in map(json.loads, (HERE / f'{method}.jsonl').open())}


def main():
  model = weights.load()
  questions = {q['question_id']: q
               for q in load_questions('../shared/data/spec_bench/question.jsonl')}
  vanilla = first_turns('vanilla')
  rows = []
  for method in METHODS:
    for qid, tokens in first_turns(method).items():
      ref = vanilla[qid]
      i = next((i for i, (a, b) in enumerate(zip(ref, tokens)) if a != b), None)
      if i is None:
        continue
      prompt = encode_prompt(model, questions[qid]['turns'][0], chat=True)
      ids_T = np.asarray(prompt + ref[:i], np.int32)[None]
      cache = init_cache(model.config, ids_T.shape[1], dtype=jnp.float32)
      logits_V = np.asarray(model_lib.forward(model.params, model.config, ids_T, cache,
                                              empty_cache=True).logits_BPV[0, -1])
      rows.append(dict(method=method, question_id=qid, position=i,
                       margin=float(logits_V[ref[i]] - logits_V[tokens[i]]),
                       logit=float(max(logits_V[ref[i]], logits_V[tokens[i]]))))
      print(json.dumps(rows[-1]), flush=True)
  (HERE / 'near_ties.json').write_text(json.dumps(rows, indent=1) + '\n')
  margins = np.abs([r['margin'] for r in rows])
  print(f'{len(rows)} first turns differ; |margin| median {np.median(margins):.3f}, '
        f'max {margins.max():.3f}; bf16 step at the median logit '
        f'{np.median([abs(r["logit"]) for r in rows]) / 128:.3f}')


if __name__ == '__main__':
  main()
