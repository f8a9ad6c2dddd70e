"""The decode attention alone (9cf6575's kernel, copied here with switches), variants timed
at a step's 32 (8B) or 30 (SmolLM2) layer calls.

Each variant's kernel (split stats only, and the whole cache attention with its fold and
layouts) is called once per layer inside one jitted function, the next layer's q depending
on the last output; wall time per call over many repetitions (so each figure includes a
small dependency fusion a layer). `equal_lib`: the variant's output equals the library's
kernel bit for bit (run at 9cf6575: its kernel). Modes: merged (9cf6575's), two_loop (the
cached blocks without the chunk's loads: this change), cache_only (no chunk keys at all: not
attention, a cost probe), empty (writes empty statistics: the launch and layout floor).

  OUT=<folder> VARIANTS='{"base": {}, "two": {"mode": "two_loop"}}' python attn_micro.py
"""
import functools, json, math, os, sys, time
import numpy as np
import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from clasp_jax import attention_pallas as ap


def make_split_stats(key_block=64, split=256, warps=4, stages=2, mode='merged'):
  def kernel(start_ref, layer_ref, q_ref, k_ref, v_ref, ck_ref, cv_ref, m_ref, l_ref, o_ref, *,
             num_tokens, group):
    kv = pl.program_id(0); row_block = pl.program_id(1); split_start = pl.program_id(2) * split
    start = start_ref[()]; layer = layer_ref[()]
    q = q_ref[...]; R, hd = q.shape
    last = start + lax.div(row_block * R + jnp.arange(R, dtype=jnp.int32), group)
    end = start + num_tokens
    hd_h = jnp.arange(hd, dtype=jnp.int32)
    span = jnp.minimum(jnp.maximum(end - split_start, 0), split)
    nb = lax.div(span + key_block - 1, key_block)
    if mode == 'empty':
      m_ref[...] = jnp.full((R,), -jnp.inf, jnp.float32) + nb.astype(jnp.float32) * 0
      l_ref[...] = jnp.zeros((R,), jnp.float32)
      o_ref[...] = jnp.zeros((R, hd), jnp.float32)
      return

    def cached(ref, bs, pos):
      return plgpu.load(ref.at[layer, pl.ds(bs, key_block), kv, :],
                        mask=jnp.broadcast_to((pos < start)[:, None], (key_block, hd)), other=0)

    def merged(cref, chref, bs, pos):
      c = cached(cref, bs, pos)
      if mode == 'cache_only':
        return c
      row = pos - start; inc = (row >= 0) & (row < num_tokens)
      ch = plgpu.load(chref.at[jnp.clip(row, 0, num_tokens - 1)[:, None], hd_h[None, :]],
                      mask=jnp.broadcast_to(inc[:, None], (key_block, hd)), other=0)
      return jnp.where(inc[:, None], ch, c)

    def body(b, carry, load):
      m, l, o = carry
      bs = split_start + b * key_block
      pos = bs + jnp.arange(key_block, dtype=jnp.int32)
      k = load(ck_ref, k_ref, bs, pos); v = load(cv_ref, v_ref, bs, pos)
      vis = pos[None, :] <= last[:, None]
      s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32) / math.sqrt(hd)
      s = jnp.where(vis, s, -jnp.inf)
      mn = jnp.maximum(m, jnp.max(s, axis=1))
      a = jnp.where(mn == m, 1.0, jnp.exp(m - mn))
      p = jnp.where(vis, jnp.exp(s - mn[:, None]), 0.0)
      l = l * a + jnp.sum(p, axis=1)
      pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                           precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
      return mn, l, o * a[:, None] + pv

    init = (jnp.full((R,), -jnp.inf, jnp.float32), jnp.zeros((R,), jnp.float32),
            jnp.zeros((R, hd), jnp.float32))
    if mode == 'two_loop':
      # Blocks wholly below start read the cache only; the rest merge the chunk's rows.
      nc = jnp.clip(lax.div(jnp.maximum(start - split_start, 0), key_block), 0, nb)
      carry = lax.fori_loop(0, nc, functools.partial(
          body, load=lambda cref, chref, bs, pos: plgpu.load(cref.at[layer, pl.ds(bs, key_block), kv, :])), init)
      carry = lax.fori_loop(nc, nb, functools.partial(body, load=merged), carry)
    else:
      carry = lax.fori_loop(0, nb, functools.partial(body, load=merged), init)
    m_ref[...], l_ref[...], o_ref[...] = carry

  def split_stats(q_BTHh, k_BTKh, v_BTKh, ck, cv, layer, start):
    B, T, H, hd = q_BTHh.shape
    L, _, S, KV, _ = ck.shape
    G = H // KV
    rows = min(64, max(16, pl.next_power_of_2(T * G)))
    nrb = pl.cdiv(T * G, rows); ns = pl.cdiv(S, split)
    q_KXh = jnp.pad(ap._rows_by_kv_head(q_BTHh, KV), ((0, 0), (0, nrb * rows - T * G), (0, 0)))
    k_KTh = k_BTKh[0].astype(ck.dtype).transpose(1, 0, 2)
    v_KTh = v_BTKh[0].astype(ck.dtype).transpose(1, 0, 2)
    X = nrb * rows
    sc = pl.BlockSpec((), lambda k, r, p: ())
    chs = pl.BlockSpec((None, T, hd), lambda k, r, p: (k, 0, 0))
    cs = pl.BlockSpec((L, None, S, KV, hd), lambda k, r, p: (0, 0, 0, 0, 0))
    st = pl.BlockSpec((None, None, rows), lambda k, r, p: (p, k, r))
    return pl.pallas_call(
        functools.partial(kernel, num_tokens=T, group=G), grid=(KV, nrb, ns),
        in_specs=[sc, sc, pl.BlockSpec((None, rows, hd), lambda k, r, p: (k, r, 0)), chs, chs, cs, cs],
        out_specs=[st, st, pl.BlockSpec((None, None, rows, hd), lambda k, r, p: (p, k, r, 0))],
        out_shape=[jax.ShapeDtypeStruct((ns, KV, X), jnp.float32)] * 2
        + [jax.ShapeDtypeStruct((ns, KV, X, hd), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=INTERPRET, name='cache_attention')(jnp.asarray(start, jnp.int32), jnp.asarray(layer, jnp.int32),
                                q_KXh, k_KTh, v_KTh, ck, cv)

  def full(q, k, v, ck, cv, layer, start):
    B, T, H, _ = q.shape
    m, l, o = split_stats(q, k, v, ck, cv, layer, start)
    _, l, o = ap._fold(m, l, o)
    return ap._normalise(l, o, B, T, H, q.dtype)
  return split_stats, full


INTERPRET = bool(os.environ.get('INTERPRET'))
SHAPES = {'8b': (32, 32, 8, 128), 'smol': (30, 9, 3, 64)}  # L, H, KV, hd


CTX = json.loads(os.environ.get('CTX', '[[256, 120], [1024, 900], [4096, 3900]]'))
if INTERPRET:
  SHAPES = {'tiny': (2, 4, 2, 16)}


def timed(fn, args, reps=int(os.environ.get('REPS', 200))):
  jax.block_until_ready(fn(*args))
  best = []
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    best.append((time.perf_counter() - t) / reps)
  return min(best)


def main():
  out_dir = os.environ['OUT']
  variants = json.loads(os.environ.get('VARIANTS', '{"base": {}}'))
  res = []
  for shape, (L, H, KV, hd) in SHAPES.items():
    for S, start in CTX:
      key = jax.random.key(0)
      ks = jax.random.split(key, 5)
      T = 16
      ck = (jax.random.normal(ks[0], (L, 1, S, KV, hd), jnp.float32)).astype(jnp.bfloat16)
      cv = (jax.random.normal(ks[1], (L, 1, S, KV, hd), jnp.float32)).astype(jnp.bfloat16)
      q = jax.random.normal(ks[2], (1, T, H, hd), jnp.float32).astype(jnp.bfloat16)
      k = jax.random.normal(ks[3], (1, T, KV, hd), jnp.float32).astype(jnp.bfloat16)
      v = jax.random.normal(ks[4], (1, T, KV, hd), jnp.float32).astype(jnp.bfloat16)
      ref = None
      for name, kw in variants.items():
        ss, full = make_split_stats(**kw)

        def step(q, k, v, ck, cv, start, which):
          f = full if which == 'full' else ss
          outs = []
          for i in range(L):
            o = f(q, k, v, ck, cv, i, start)
            o0 = o if which == 'full' else o[2]
            q = q + (o0.reshape(-1)[0] * 0).astype(q.dtype)  # a dependency, no arithmetic change
            outs.append(o0)
          return outs[-1], q
        row = dict(shape=shape, S=S, start=start, variant=name, **kw)
        for which in (('split', 'full') if name == 'base' else ('full',)):
          f = jax.jit(functools.partial(step, which=which))
          args = (q, k, v, ck, cv, jnp.int32(start))
          try:
            out = f(*args)[0]
            row[f'us_{which}'] = round(1e6 * timed(lambda *a: f(*a)[0], args) / L, 2)
            if which == 'full':
              lib = ap.cache_attention_pallas(q, k, v, ck, cv, L - 1, jnp.int32(start), interpret=INTERPRET)
              row['equal_lib'] = bool(jnp.array_equal(out, lib))
          except Exception as e:  # noqa
            row[f'err_{which}'] = str(e)[:300]
        print(json.dumps(row), flush=True)
        res.append(row)
        json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0].device_kind), rows=res),
                  open(f'{out_dir}/attn_micro.json', 'w'), indent=1)


if __name__ == '__main__':
  main()
