"""Launch settings of the two cache-attention kernels at decode shapes: GPU busy us per layer.

Each variant sets (stages, warps) of the split kernel and of the fold separately, and
KEY_BLOCK / FOLD_ROWS / FOLD_COLS; one jitted program applies the attention at every layer.
Rows to $OUT/attn.jsonl as they come; stops after BUDGET seconds. Written against commit
b71f6c5's kernels (NUM_STAGES 2: the BASE variant); on a CPU it runs a tiny shape in
interpret mode.

  OUT=<folder> BUDGET=230 python attn_tune.py
"""
import json, os, sys, time, types
import numpy as np, jax, jax.numpy as jnp
from jax.experimental import pallas as real_pl
from jax.experimental.pallas import triton as plgpu
from clasp_jax import attention_pallas as ap
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '../../h200/decode/attention_fold'))
from gpu_trace import decode_inputs, kernel_microseconds, unrolled

OUT = os.environ.get('OUT', '/tmp')
BUDGET = float(os.environ.get('BUDGET', '240'))
INTERP = jax.default_backend() != 'gpu'
T0 = time.time()
SETTINGS = {}  # kernel name -> (stages, warps)


def pallas_call(*args, name=None, compiler_params=None, **kw):
  """`pl.pallas_call` with the launch settings of SETTINGS for the kernels it names."""
  if name in SETTINGS:
    st, w = SETTINGS[name]
    compiler_params = plgpu.CompilerParams(num_warps=w, num_stages=st)
  return real_pl.pallas_call(*args, name=name, compiler_params=compiler_params, **kw)


proxy = types.SimpleNamespace(**{k: getattr(real_pl, k) for k in dir(real_pl) if not k.startswith('__')})
proxy.pallas_call = pallas_call
ap.pl = proxy

SHAPES = [('smollm2', dict(L=30, KV=3, H=9, hd=64), 2048, 1000),
          ('l8b', dict(L=32, KV=8, H=32, hd=128), 2048, 1000),
          ('l8b', dict(L=32, KV=8, H=32, hd=128), 8192, 4000)]
if INTERP:
  SHAPES = [('tiny', dict(L=2, KV=2, H=4, hd=64), 256, 100)]
BASE = dict(split=(2, 4), fold=(2, 4), kb=64, fr=16, fc=32)
VARIANTS = [{}, dict(split=(1, 4)), dict(split=(3, 4)), dict(split=(4, 4)), dict(split=(2, 2)),
            dict(split=(2, 8)), dict(split=(3, 8)), dict(fold=(1, 4)), dict(fold=(1, 2)),
            dict(fold=(2, 2)), dict(fold=(1, 1)), dict(fc=64), dict(fr=32), dict(kb=32),
            dict(kb=128), {}]
for shape, s, cap, start in SHAPES:
  args = decode_inputs(s['L'], s['KV'], s['H'], s['hd'], cap, start, 16)
  ref = None
  for v in VARIANTS:
    if time.time() - T0 > BUDGET:
      print('budget spent', flush=True); sys.exit(0)
    p = {**BASE, **v}
    SETTINGS['cache_attention'], SETTINGS['cache_attention_fold'] = p['split'], p['fold']
    ap.KEY_BLOCK, ap.FOLD_ROWS, ap.FOLD_COLS = p['kb'], p['fr'], p['fc']
    jax.clear_caches()
    fn = unrolled(ap, s['L'], INTERP)
    try:
      out = jax.block_until_ready(fn(*args))
    except Exception as e:
      print(shape, cap, p, 'error', str(e)[:300], flush=True); continue
    same = None
    if ref is None:
      ref = out
    else:
      same = all(bool(jnp.array_equal(a, b)) for a, b in zip(out, ref))
    walls = []
    for _ in range(7):
      t = time.perf_counter(); jax.block_until_ready(fn(*args)); walls.append(time.perf_counter() - t)
    agg = kernel_microseconds(fn, args, 3)
    L = s['L']
    row = dict(shape=shape, capacity=cap, start=start, **{k: list(x) if isinstance(x, tuple) else x for k, x in p.items()},
               wall_us_layer=round(1e6 * float(np.median(walls)) / L, 2),
               split_us=round(agg.get('cache_attention', 0) / L, 2),
               fold_us=round(agg.get('cache_attention_fold', 0) / L, 2),
               busy_us_layer=round(sum(agg.values()) / L, 2), same_bits_as_base=same)
    print(json.dumps(row), flush=True)
    with open(f'{OUT}/attn.jsonl', 'a') as f:
      f.write(json.dumps(row) + '\n')
