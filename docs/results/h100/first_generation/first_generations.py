"""EXPERIMENT: a new process's first generations, decode seconds each (compiles apart).

Usage: OUT=<folder> python first_generations.py <model> <cache folder>
"""
import json, os, sys
from clasp_jax import weights
from clasp_jax.engine import enable_compilation_cache
from clasp_jax.generation import make_decoder, encode_prompt
enable_compilation_cache(sys.argv[2])
m = weights.load(sys.argv[1], cache_dir=sys.argv[2])
ids = encode_prompt(m, 'Write a detailed essay about the history of the printing press.', chat=True)
row = dict(env={k: os.environ.get(k) for k in ('XLA_PYTHON_CLIENT_PREALLOCATE', 'CUDA_MODULE_LOADING')})
for method in ('vanilla', 'clasp'):
  d = make_decoder(m, method)
  row[method] = []
  for _ in range(3):
    g = d.generate(ids, 256)
    row[method].append(dict(new=g.new_tokens, decode_s=round(g.decode_seconds, 4),
                            compile_s=round(g.compile_seconds, 3), tok_s=round(g.tokens_per_second, 1)))
print(json.dumps(row), flush=True)
with open(os.environ['OUT'] + '/firstgen.jsonl', 'a') as f:
  f.write(json.dumps(row) + '\n')
