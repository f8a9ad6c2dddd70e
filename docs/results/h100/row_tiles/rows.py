"""Does the fused cache attention give a row the same bits whatever the pass's row count and
row block, and what does a pass of fewer rows cost?  Written for, and run at, commit aaecd91's
kernels (whose row block was sized by the chunk, at most MAX_ROW_BLOCK rows); from the
repository root:

  OUT=<folder> python docs/results/h100/row_tiles/rows.py    # rows.json

Bits: row t's output of a T-row pass against the same row of a 16-row pass (same cache, same
start, the first T rows of the same q/k/v), for T in 1, 9 and MAX_ROW_BLOCK 16 / 32 / 64.
Time: the attention at every layer of one program (gpu_trace.unrolled), GPU busy per layer.
"""
import json, os, sys
import numpy as np, jax, jax.numpy as jnp
from clasp_jax import attention_pallas as ap
sys.path.insert(0, 'docs/results/h200/decode/attention_fold')
from gpu_trace import decode_inputs, kernel_microseconds, unrolled

OUT = os.environ.get('OUT', '/tmp')
INTERP = jax.default_backend() != 'gpu'
SHAPES = [('smollm2', dict(L=30, KV=3, H=9, hd=64), 2048, 1000),
          ('l8b', dict(L=32, KV=8, H=32, hd=128), 2048, 1000),
          ('l8b', dict(L=32, KV=8, H=32, hd=128), 8192, 4000)]
if INTERP:
  SHAPES = [('tiny', dict(L=2, KV=2, H=4, hd=64), 256, 100)]
rows_out = []


def emit(**row):
  print(json.dumps(row), flush=True)
  rows_out.append(row)


for shape, s, cap, start in SHAPES:
  L = s['L']
  qs, ck, cv, st = decode_inputs(L, s['KV'], s['H'], s['hd'], cap, start, 16)
  results = {}
  for mrb in (64, 32, 16):
    ap.MAX_ROW_BLOCK = mrb
    for T in (16, 9, 1):
      jax.clear_caches()
      fn = unrolled(ap, L, INTERP)
      args = ([q[:, :T] for q in qs], ck, cv, st)
      out = jax.block_until_ready(fn(*args))
      results[mrb, T] = [np.asarray(o.astype(jnp.float32)) for o in out]
      ref = results[64, 16]
      same = all(np.array_equal(o, r[:, :T]) for o, r in zip(results[mrb, T], ref))
      nd = sum(int(np.sum(o != r[:, :T])) for o, r in zip(results[mrb, T], ref))
      agg = kernel_microseconds(fn, args, 5) if not INTERP else {}
      emit(shape=shape, capacity=cap, start=start, max_row_block=mrb, T=T,
           same_bits_as_T16_mrb64=same, differing=nd,
           split_us=round(agg.get('cache_attention', 0) / L, 2),
           fold_us=round(agg.get('cache_attention_fold', 0) / L, 2),
           busy_us_layer=round(sum(agg.values()) / L, 2))
  # Several starts: row 0 of a 1-row pass against a 16-row pass at the default row block.
  ap.MAX_ROW_BLOCK = 64
  jax.clear_caches()
  fn = unrolled(ap, L, INTERP)
  diffs = []
  for start2 in (1, 63, 64, 65, 200, cap - 16, cap // 2 - 17):
    st2 = jnp.int32(start2)
    a = fn(qs, ck, cv, st2)
    b = fn([q[:, :1] for q in qs], ck, cv, st2)
    diffs.append(sum(int(jnp.sum(x[:, :1] != y)) for x, y in zip(a, b)))
  emit(shape=shape, capacity=cap, starts_checked=7, row0_T1_vs_T16_differing=diffs)

with open(f'{OUT}/rows.json', 'w') as f:
  json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0]), rows=rows_out), f, indent=1)
