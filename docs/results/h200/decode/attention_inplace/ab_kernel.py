"""A/B: plain decoding through Decoder.generate with the decode attention kernel of the
parent commit (old) and of this change, in one process, decoders timed in turns. Per token =
(t(long) - t(short)) / (long - short), medians of REPS. First, the kernels alone compared bit
for bit (BITWISE=1).

Variants: old (9cf6575's kernel and fold: `git show 9cf6575:clasp_jax/attention_pallas.py >
attention_pallas_old.py` beside this script); new (this kernel, the sequential fold, splits of
256 positions for every model); new_s128 (splits of 128); tree_sN (splits of N, the splits
folded pairwise in a balanced tree: tried, not adopted).

  OUT=<folder> CASES='[["llama3-8b", 1024]]' VARIANTS='["old", "new"]' python ab_kernel.py
"""
import json, os, sys, time
import numpy as np
import jax
sys.path.insert(0, os.path.dirname(__file__))
import attention_pallas_old as old
from clasp_jax import attention_pallas as ap, strategies
from clasp_jax.bench import decode
from clasp_jax.configs import models
from clasp_jax.engine import Decoder
import jax.numpy as jnp
from jax.experimental import pallas as pl

OUT = os.environ['OUT']
CASES = json.loads(os.environ.get('CASES', '[["llama3-8b", 1024], ["smollm2-135m", 1024]]'))
VARIANTS = json.loads(os.environ.get('VARIANTS', '["new", "tree_s128", "tree_s64"]'))
SHORT, LONG, REPS = 32, 160, int(os.environ.get('REPS', 3))
new_split_stats, seq_fold = ap.split_stats, ap._fold


def tree_fold(m_PKX, l_PKX, o_PKXh):
  """The splits merged pairwise by index, padded to a power of two with empty splits."""
  stats = (m_PKX, l_PKX, o_PKXh)
  width = pl.next_power_of_2(m_PKX.shape[0]) - m_PKX.shape[0]
  stats = tuple(jnp.pad(x, [(0, width)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
                for x, fill in zip(stats, (-jnp.inf, 0.0, 0.0)))
  while stats[0].shape[0] > 1:
    stats = ap._merge(tuple(x[0::2] for x in stats), tuple(x[1::2] for x in stats))
  return tuple(x[0] for x in stats)


def setvariant(v):
  ap.split_stats = old.split_stats if v == 'old' else new_split_stats
  ap._fold = tree_fold if v.startswith('tree') else seq_fold
  ap.SPLIT_SIZE = ap.SPLIT_SIZE_FEW_KV_HEADS = int(v.split('_s')[1]) if '_s' in v else 256


# The kernels alone, bit for bit: old and new at the 8B and SmolLM2 head shapes.
key = jax.random.key(1)
for (H, KV, hd) in ((32, 8, 128), (9, 3, 64)) if os.environ.get('BITWISE', '1') == '1' else ():
  for S, start in ((1024, 0), (1024, 900), (4096, 3000)):
    ks = jax.random.split(key, 5)
    mk = lambda k, s: jax.random.normal(k, s, jnp.float32).astype(jnp.bfloat16)
    args = (mk(ks[0], (1, 16, H, hd)), mk(ks[1], (1, 16, KV, hd)), mk(ks[2], (1, 16, KV, hd)),
            mk(ks[3], (2, 1, S, KV, hd)), mk(ks[4], (2, 1, S, KV, hd)), jnp.int32(1), jnp.int32(start))
    for f in ('cache_attention_pallas', 'prefix_attention_pallas'):
      jax.clear_caches(); setvariant('old'); a = jax.jit(getattr(ap, f))(*args)
      jax.clear_caches(); setvariant('new'); b = jax.jit(getattr(ap, f))(*args)
      jax.clear_caches(); setvariant('tree_s128'); c = jax.jit(getattr(ap, f))(*args)
      jax.clear_caches(); setvariant('tree_s128'); c2 = jax.jit(getattr(ap, f))(*args[:3], args[3][:, :, :S // 2], args[4][:, :, :S // 2], *args[5:]) if start + 16 <= S // 2 else c
      print('kernel bitwise', H, KV, hd, S, start, f, 'old==new', bool(jnp.array_equal(a, b)),
            'tree_s128 max diff', float(jnp.max(jnp.abs(a.astype(jnp.float32) - c.astype(jnp.float32)))),
            'tree_s128 half capacity equal', bool(jnp.array_equal(c, c2)), flush=True)

rows = []
for preset, context in CASES:
  config = models.PRESETS[preset]()
  params = decode.random_params(config, jax.random.key(0), jnp.bfloat16)
  prompt = np.random.RandomState(0).randint(0, config.vocab_size, context - LONG).tolist()
  decs = {}
  for v in VARIANTS:
    jax.clear_caches(); setvariant(v)
    decs[v] = Decoder(params, config, strategies.build('vanilla', config), attention='pallas')
    t = time.time()
    for n in (SHORT, LONG):
      decs[v].generate(prompt, n)
    print(preset, context, v, 'warm', round(time.time() - t, 1), flush=True)
  times = {v: {SHORT: [], LONG: []} for v in VARIANTS}
  toks = {}
  for _ in range(REPS):
    for n in (SHORT, LONG):
      for v, d in decs.items():
        t = time.perf_counter(); g = d.generate(prompt, n); times[v][n].append(time.perf_counter() - t)
        toks[v] = g.token_ids
  for v in VARIANTS:
    ms = 1e3 * (np.median(times[v][LONG]) - np.median(times[v][SHORT])) / (LONG - SHORT)
    bw = decode.BANDWIDTH.get(jax.devices()[0].device_kind)
    roof = 1e3 * decode.weight_bytes(params) / bw if bw else None
    row = dict(preset=preset, context=context, variant=v, ms_per_token=round(ms, 4),
               roofline_fraction=round(roof / ms, 4) if roof else None,
               same_tokens_as_old=toks[v] == toks.get('old', toks[v]),
               same_tokens_as_new=toks[v] == toks.get('new', toks[v]),
               times_short=times[v][SHORT], times_long=times[v][LONG])
    print(json.dumps({k: row[k] for k in list(row)[:7]}), flush=True)
    rows.append(row)
  json.dump(dict(jax=jax.__version__, device=jax.devices()[0].device_kind, short=SHORT, long=LONG,
                 reps=REPS, rows=rows), open(f'{OUT}/ab_kernel.json', 'w'), indent=1)
  del decs, params
