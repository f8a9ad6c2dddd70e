"""EXPERIMENT: what a new process's first prefill pays (cuDNN? cuBLAS?).

Usage: OUT=<folder> python first_prefill.py <model> <cache folder> <tag>; tags: base; nocudnn
(the prefill without cuDNN's attention); probe (a small cuDNN attention and a GEMM run first);
prewarm (that cuDNN attention run in a thread while the weights load).
"""
import json, os, sys, time
import jax, jax.numpy as jnp
import numpy as np
from clasp_jax import weights, engine
from clasp_jax.engine import enable_compilation_cache
from clasp_jax.generation import make_decoder, encode_prompt
tag = sys.argv[3]
T0 = time.perf_counter()
enable_compilation_cache(sys.argv[2])
row = dict(tag=tag)
def timed(name, fn):
  t = time.perf_counter(); out = jax.block_until_ready(fn()); row[name] = round((time.perf_counter() - t) * 1e3, 2); return out
if tag == 'nocudnn':
  engine.resolve_prompt_attention = lambda *a, **k: None
if tag == 'probe':
  x = jnp.ones((1, 128, 9, 64), jnp.bfloat16)
  att = jax.jit(lambda q: jax.nn.dot_product_attention(q, q[:, :, :3], q[:, :, :3], is_causal=True, implementation='cudnn'))
  c = timed('cudnn_compile_ms', lambda: att.lower(x).compile())
  timed('cudnn_run0_ms', lambda: c(x)); timed('cudnn_run1_ms', lambda: c(x))
  a = jnp.ones((2048, 2048), jnp.bfloat16)
  mm = jax.jit(lambda a: a @ a)
  c = timed('gemm_compile_ms', lambda: mm.lower(a).compile())
  timed('gemm_run0_ms', lambda: c(a)); timed('gemm_run1_ms', lambda: c(a))
if tag == 'prewarm':
  import threading
  def warm():
    x = jnp.ones((1, 128, 9, 64), jnp.bfloat16)
    f = jax.jit(lambda q: jax.nn.dot_product_attention(q, q[:, :, :3], q[:, :, :3], is_causal=True, implementation='cudnn'))
    jax.block_until_ready(f(x))
  th = threading.Thread(target=warm); th.start()
m = weights.load(sys.argv[1] or None, cache_dir=sys.argv[2])
ids = encode_prompt(m, 'Write a detailed essay about the history of the printing press.', chat=True)
d = make_decoder(m, 'vanilla')
row['compile_ms'] = round(d.compile(len(ids), 256) * 1e3)
if tag == 'prewarm':
  t = time.perf_counter(); th.join(); row['join_ms'] = round((time.perf_counter() - t) * 1e3, 2)
for k in range(2):
  timed(f'prefill{k}_ms', lambda: d.start(ids, 256))
  if k == 0:
    row['first_token_s'] = round(time.perf_counter() - T0, 3)
for k in range(2):
  g = d.generate(ids, 256)
  row[f'gen{k}_ms'] = round(g.decode_seconds * 1e3, 2)
row['tokens'] = hash(tuple(g.token_ids)) % 10**8
print(json.dumps(row), flush=True)
with open(os.environ['OUT'] + '/firstgen3.jsonl', 'a') as f:
  f.write(json.dumps(row) + '\n')
