"""Which fused-attention variants give a query the same bits whatever the pass, and at what cost.

    git show aaecd91:clasp_jax/attention_pallas.py > base_ap.py
    git worktree add tiles aaecd91 && git -C tiles apply \
        "$PWD/docs/results/h100/row_tiles/row_tiles.patch"
    OUT=<folder> python docs/results/h100/row_tiles/variants.py base_ap.py \
        tiles/clasp_jax/attention_pallas.py

Variants: base (the first path: the row block and the fold's tiles sized by the chunk),
tiles (the second: every row in 16-row tiles, several a program), sum (this commit's module
with a block's weight sum a `jnp.sum` of the float32 weights, as base had it) and this (the
installed `clasp_jax`: the row block sized by the real rows, the weight sum a product, the
fold in fixed 16-row tiles). Part A: GPU busy µs per layer of the split and fold kernels, a
16-row chunk with 16, 9 or 1 real rows (base: 16). Part B: a query at position p as row j
of a 16-row pass at p - j, as row j of a 9-row pass at p - j, and as the one real row of a
plain step at p (base: chunks of 16, 9 and 1 tokens); rows whose bits differ from the
16-row pass's. Random bf16 q/k/v and cache. On a CPU the kernels run in interpret mode, at
a tiny shape, Part B only.
"""
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax import attention_pallas

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '../../h200/decode/attention_fold'))
from gpu_trace import decode_inputs, kernel_microseconds, unrolled  # noqa: E402

# The weights' sum as base had it: of the float32 weights, before their cast to the values'.
SUM_EDITS = [
    ("    p_RC = jnp.where(visible_RC, jnp.exp(s_RC - m_new_R[:, None]), 0.0).astype(v_Ch.dtype)",
     "    p32_RC = jnp.where(visible_RC, jnp.exp(s_RC - m_new_R[:, None]), 0.0)\n"
     "    p_RC = p32_RC.astype(v_Ch.dtype)"),
    ("    l_R = l_R * alpha_R + sum_R", "    l_R = l_R * alpha_R + jnp.sum(p32_RC, axis=1)"),
]


def load(name, path, edits=()):
  """The module at `path`, with each (old, new) of `edits` made once."""
  src = open(path).read()
  for old, new in edits:
    assert src.count(old) == 1, old
    src = src.replace(old, new)
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
  exec(compile(src, path, 'exec'), module.__dict__)
  return module


MODULES = dict(base=load('base_ap', sys.argv[1]), tiles=load('tiles_ap', sys.argv[2]),
               sum=load('sum_ap', attention_pallas.__file__, SUM_EDITS), this=attention_pallas)
OUT = os.environ.get('OUT', '/tmp')
INTERPRET = jax.default_backend() != 'gpu'
# (name, shape, capacity, starts timed, starts of Part B)
SHAPES = ([('tiny', dict(L=2, KV=2, H=4, hd=64), 256, [], [60, 100])] if INTERPRET else
          [('smollm2', dict(L=30, KV=3, H=9, hd=64), 2048, [1000], [63, 200, 1000, 1001]),
           ('l8b', dict(L=32, KV=8, H=32, hd=128), 2048, [1000], [63, 1000, 1001]),
           ('l8b', dict(L=32, KV=8, H=32, hd=128), 8192, [4000], [4000, 4011])])


def program(name, num_layers, num_rows):
  """The variant's attention at every layer of one program, a chunk with `num_rows` real rows
  (base: all of its rows)."""
  rows = {} if name == 'base' else {'num_rows': num_rows}
  return unrolled(MODULES[name], num_layers, INTERPRET, **rows)


rows = []


def emit(row):
  print(json.dumps(row), flush=True)
  rows.append(row)


for shape, s, capacity, time_starts, bit_starts in SHAPES:
  L, KV, H, hd = s['L'], s['KV'], s['H'], s['hd']
  for start in time_starts:  # Part A
    args = decode_inputs(L, KV, H, hd, capacity, start, 16)
    for name in MODULES:
      for n in (16,) if name == 'base' else (16, 9, 1):
        f = program(name, L, n)
        jax.block_until_ready(f(*args))
        us = kernel_microseconds(f, args, 5)
        emit(dict(part='A', shape=shape, capacity=capacity, start=start, variant=name,
                  num_rows=n, split_us=round(us.get('cache_attention', 0) / L, 2),
                  fold_us=round(us.get('cache_attention_fold', 0) / L, 2)))
  # Part B: one sequence of packed q/k/v per layer, its keys and values also in the cache.
  Lb = 4 if not INTERPRET else L
  seq_LNnh = jnp.asarray(np.random.default_rng(1).standard_normal((Lb, capacity, H + 2 * KV, hd)),
                         jnp.bfloat16)
  cache_k, cache_v = seq_LNnh[:, None, :, H:H + KV], seq_LNnh[:, None, :, H + KV:]

  def chunk(start, T):
    return [jax.lax.dynamic_slice_in_dim(seq_LNnh[i], start, T, 0)[None, :, None]
            for i in range(Lb)]

  for name in MODULES:
    out = {}
    for start in bit_starts:
      for T, n in ((16, 16), (9, 9), (1, 1)) if name == 'base' else ((16, 16), (16, 9), (16, 1)):
        f = program(name, Lb, n)
        for j in range(16 if n == 1 else 1):
          out[start + j, n] = [np.asarray(o.astype(jnp.float32))[0]
                               for o in f(chunk(start + j, T), cache_k, cache_v,
                                          jnp.int32(start + j))]
    nine = one = 0
    for start in bit_starts:
      full = out[start, 16]
      nine += sum(not all(np.array_equal(a[j], b[j]) for a, b in zip(out[start, 9], full))
                  for j in range(9))
      one += sum(not all(np.array_equal(a[0], b[j]) for a, b in zip(out[start + j, 1], full))
                 for j in range(16))
    emit(dict(part='B', shape=shape, capacity=capacity, variant=name, starts=bit_starts,
              rows_differing_9_vs_16=f'{nine}/{9 * len(bit_starts)}',
              rows_differing_1_vs_16=f'{one}/{16 * len(bit_starts)}'))

with open(f'{OUT}/variants.json', 'w') as f:
  json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0]), rows=rows), f, indent=1)
