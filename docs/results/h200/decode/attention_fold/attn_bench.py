"""The fused cache attention per layer (split kernel + fold) at decode shapes: commit d26ee11's
(XLA folds every split) against a Pallas fold that reads only the splits a pass sees
(`fold_seq.patch`), at several split sizes. One jitted program applies it at every layer
(unrolled, as the accelerator path does); GPU kernel time from a profiler trace, wall time per
call. To run it: a checkout of d26ee11 with the patch applied (`git apply`), d26ee11's
`clasp_jax/attention_pallas.py` copied beside this script as `attention_pallas_old.py`, then
`OUT=<folder> python <this script>` from the checkout's root (TINY=1: a tiny shape, for CPU)."""
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np, jax, jax.numpy as jnp
from clasp_jax import attention_pallas as new
import attention_pallas_old as old
from gpu_trace import decode_inputs, kernel_microseconds, unrolled

SHAPES = dict(tiny=dict(L=2, KV=2, H=4, hd=64)) if os.environ.get("TINY") else dict(smollm2=dict(L=30, KV=3, H=9, hd=64), l8b=dict(L=32, KV=8, H=32, hd=128))
T = 16
INTERP = jax.default_backend() != "gpu"
OUT = os.environ.get('OUT', '/tmp')

rows = []
for shape, s in SHAPES.items():
  L, KV, H, hd = s['L'], s['KV'], s['H'], s['hd']
  for cap, start in ((2048, 1000), (8192, 4000)):
    args = decode_inputs(L, KV, H, hd, cap, start, T)
    ref = None
    variants = [('old', old, None)] + [('new', new, sp) for sp in (64, 128, 256)]
    for name, mod, sp in variants:
      if sp:
        new.SPLIT_SIZE = new.SPLIT_SIZE_FEW_KV_HEADS = sp
      jax.clear_caches()
      fn = unrolled(mod, L, INTERP)
      out = jax.block_until_ready(fn(*args))
      if ref is None:
        ref = out
      same = all(bool(jnp.array_equal(a, b)) for a, b in zip(out, ref))
      walls = []
      for _ in range(30):
        t0 = time.perf_counter(); jax.block_until_ready(fn(*args)); walls.append(time.perf_counter() - t0)
      jax.block_until_ready(fn(*args))
      agg = kernel_microseconds(fn, args, calls=3)
      row = dict(shape=shape, capacity=cap, start=start, impl=name,
                 split=sp or (old.split_size(KV)), same_as_old=same,
                 wall_us_per_layer=1e6 * float(np.median(walls)) / L,
                 busy_us_per_layer=sum(agg.values()) / L,
                 kernels={k[:60]: v / L for k, v in sorted(agg.items(), key=lambda x: -x[1])})
      rows.append(row)
      print(f"{shape:8s} cap {cap:5d} {name} split {row['split']:4d} same {same!s:5s} wall {row['wall_us_per_layer']:6.2f} busy {row['busy_us_per_layer']:6.2f} us/layer  "
            + '  '.join(f'{k[:28]}={v:.2f}' for k, v in list(row['kernels'].items())[:4]), flush=True)
json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0]), rows=rows), open(f'{OUT}/attn_bench.json', 'w'), indent=1)
