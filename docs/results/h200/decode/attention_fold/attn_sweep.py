"""The fused cache attention per layer at decode shapes: commit d26ee11's (XLA folds every
split) against this folder's commit's (a Pallas fold of the splits a pass sees, 16 at a time),
at several split sizes and warp counts. One jitted program applies it at every layer
(unrolled, as the accelerator path does); GPU busy time per kernel from a profiler trace of
two calls, wall time per call (median of 5). To run it from a checkout of the commit that
added it: `git show d26ee11:clasp_jax/attention_pallas.py` saved beside this script as
`attention_pallas_old.py`, then `OUT=<folder> python <this script>` (TINY=1: a tiny shape, in
interpret mode, for the CPU)."""
import json, os, time
import numpy as np, jax
import sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clasp_jax import attention_pallas as new
import attention_pallas_old as old
from gpu_trace import decode_inputs, kernel_microseconds, unrolled

SHAPES = dict(smollm2=dict(L=30, KV=3, H=9, hd=64), l8b=dict(L=32, KV=8, H=32, hd=128))
T = 16
OUT = os.environ.get('OUT', '/tmp')
INTERP = jax.default_backend() != 'gpu'

rows = []
VARIANTS = {'smollm2': [('old', 128, 4), ('new', 64, 4), ('new', 64, 8), ('new', 128, 4)],
            'l8b': [('old', 256, 4), ('new', 128, 4), ('new', 128, 8), ('new', 64, 4)]}
if os.environ.get('TINY'):
  SHAPES = dict(tiny=dict(L=2, KV=2, H=4, hd=64)); VARIANTS['tiny'] = VARIANTS['smollm2'][:2]
for shape, s in SHAPES.items():
  L, KV, H, hd = s['L'], s['KV'], s['H'], s['hd']
  for cap, start in ((2048, 1000), (8192, 4000)):
    args = decode_inputs(L, KV, H, hd, cap, start, T)
    for impl, sp, w in VARIANTS[shape]:
      st, kb = 2, 64
      ap = dict(old=old, new=new)[impl]
      ap.SPLIT_SIZE = ap.SPLIT_SIZE_FEW_KV_HEADS = sp
      ap.NUM_WARPS = w
      jax.clear_caches()
      fn = unrolled(ap, L, INTERP)
      try:
        jax.block_until_ready(fn(*args))
      except Exception as e:  # a launch setting Triton refuses
        print(shape, cap, sp, w, st, kb, 'error', str(e)[:200], flush=True); continue
      walls = []
      for _ in range(5):
        t0 = time.perf_counter(); jax.block_until_ready(fn(*args)); walls.append(time.perf_counter() - t0)
      agg = kernel_microseconds(fn, args, calls=2)
      row = dict(impl=impl, shape=shape, capacity=cap, start=start, split=sp, warps=w, stages=st, key_block=kb,
                 wall_us_per_layer=1e6 * float(np.median(walls)) / L,
                 busy_us_per_layer=sum(agg.values()) / L,
                 kernel_us_per_layer=agg.get('cache_attention', 0.0) / L,
                 kernels={k[:60]: v / L for k, v in sorted(agg.items(), key=lambda x: -x[1])})
      rows.append(row)
      json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0]), rows=rows), open(f'{OUT}/attn_sweep.json', 'w'), indent=1)
      print(f"{impl} {shape:8s} cap {cap:5d} split {sp:4d} warps {w} stages {st} kb {kb:4d} wall {row['wall_us_per_layer']:6.2f} busy {row['busy_us_per_layer']:6.2f} kernel {row['kernel_us_per_layer']:6.2f}", flush=True)
json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0]), rows=rows), open(f'{OUT}/attn_sweep.json', 'w'), indent=1)
