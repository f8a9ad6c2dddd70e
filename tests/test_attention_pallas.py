"""The fused cache attention kernel: against `attention.cache_attention`, and its contract.

The kernel runs natively on a GPU and in Pallas's interpret mode elsewhere (CPU tests). The
contract tests compare with np.array_equal: a query's result may depend only on its position
and on the keys and values up to it (see `attention`'s module docstring).
"""

import functools
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clasp_jax import attention
from clasp_jax import attention_pallas
from clasp_jax import strategies
from clasp_jax.engine import Decoder
import tiny

INTERPRET = jax.default_backend() != 'gpu'
KV = 2
HD = 64
LAYERS = 2
LAYER = 1  # the layer read; the other one holds different values
# Across key-block (64) and split (64, 128, 256) boundaries.
STARTS = (0, 5, 127, 128, 300)
# Finite, so that the reference (which reads the cache after the chunk, with zero weights)
# stays finite; the contract tests use NaN, which only the kernel can take.
GARBAGE = 3e4


def _rng(*params) -> np.random.Generator:
  """Fresh random values for each case, reproducibly."""
  return np.random.default_rng(zlib.crc32(repr(params).encode()))


def _case(rng, dtype, T, G, S, start, garbage):
  """Random roped q, k, v of a chunk at `start` and [L, 1, S, KV, hd] caches, every layer
  random below `start` and `garbage` from it on."""
  def normal(*shape):
    return rng.standard_normal(shape, np.float32)
  below_S = (np.arange(S) < start)[:, None, None]
  caches = [jnp.asarray(np.where(below_S, normal(LAYERS, 1, S, KV, HD), garbage), dtype)
            for _ in range(2)]
  return (jnp.asarray(normal(1, T, G * KV, HD), dtype), jnp.asarray(normal(1, T, KV, HD), dtype),
          jnp.asarray(normal(1, T, KV, HD), dtype), *caches)


@functools.partial(jax.jit, static_argnames=('static_layer', 'prefix'))
def _kernel_and_reference(q, k, v, cache_k, cache_v, layer, start, static_layer, prefix=False):
  """The kernel with the layer traced, with it static, and the reference: of the cache
  attention, or (`prefix`) of the DP's prefix attention."""
  kernel, reference = ((attention_pallas.prefix_attention_pallas, attention.prefix_attention)
                       if prefix else
                       (attention_pallas.cache_attention_pallas, attention.cache_attention))
  pallas = functools.partial(kernel, interpret=INTERPRET)
  return (pallas(q, k, v, cache_k, cache_v, layer, start),
          pallas(q, k, v, cache_k, cache_v, static_layer, start),
          reference(q, k, v, cache_k, cache_v, layer, start))


def _assert_close(outs, ref, shape, dtype, tol, where):
  """Each kernel output has the shape and dtype, no NaN, and is within `tol` of `ref`."""
  ref = np.asarray(ref, np.float32)
  for out in outs:
    assert out.shape == shape and out.dtype == dtype
    out = np.asarray(out, np.float32)
    assert not np.isnan(out).any(), where
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < tol, where


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
# Rows T * G of a KV head: 4 padded to a block of 16 (a plain step, GQA), 16 exactly (MHA),
# 48 padded to 64 (a verify pass, a group of 3).
@pytest.mark.parametrize('T,G', [(1, 4), (16, 1), (16, 3)])
def test_matches_reference(dtype, tol, T, G):
  S = 384  # room for the last start's chunk
  for start in STARTS:
    inputs = _case(_rng(dtype, T, G, start), dtype, T, G, S, start, GARBAGE)
    # IEEE float32 products in the reference too (on a GPU, XLA's default may be TF32).
    with jax.default_matmul_precision('highest'):
      traced, static, ref = _kernel_and_reference(*inputs, jnp.int32(LAYER), jnp.int32(start),
                                                  static_layer=LAYER)
    _assert_close((traced, static), ref, (1, T, G * KV * HD), dtype, tol, start)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('split', [attention_pallas.SPLIT_SIZE_FEW_KV_HEADS,
                                   attention_pallas.SPLIT_SIZE])
def test_depends_only_on_position_and_keys_up_to_it(dtype, split, monkeypatch, request):
  """Row 0 of a pass at start p equals row j of a pass at start p - j, whatever the other
  rows, the keys after p, the cache's capacity or how many of the pass's rows are real
  (`num_rows`, a plain step's one token against a verify pass's nine); the cache at and after
  `start` is NaN.
  Both split sizes (KV = 2 takes the few-KV-heads one, here set to each), folded two splits
  at a time so that passes end in different groups (the kernels' traces are dropped before
  and after, as these constants are read when tracing)."""
  monkeypatch.setattr(attention_pallas, 'SPLIT_SIZE_FEW_KV_HEADS', split)
  monkeypatch.setattr(attention_pallas, 'FOLD_GROUP', 2)
  jax.clear_caches()
  request.addfinalizer(jax.clear_caches)
  T, G, S = 16, 3, 512
  pallas = {n: jax.jit(functools.partial(attention_pallas.cache_attention_pallas,
                                         num_rows=n, interpret=INTERPRET))
            for n in (None, 1, 2, 9, 16)}
  rng = _rng(dtype, 'contract')
  true_k_XKh, true_v_XKh, q_Hh = (rng.standard_normal(shape, np.float32)
                                  for shape in ((2 * S, KV, HD), (2 * S, KV, HD), (G * KV, HD)))
  other_layer_SKh = rng.standard_normal((2 * S, KV, HD), np.float32)

  def run(p, j, capacity, num_rows=None):
    """The pass at start p - j, in which the query at position p is row j."""
    start = p - j
    # The true keys and values up to p; fresh random ones after it (and in the queries of
    # the other rows): nothing but positions <= p may matter to row j.
    k_XKh, v_XKh = (np.concatenate([x[:p + 1], rng.standard_normal(x[p + 1:].shape)])
                    for x in (true_k_XKh, true_v_XKh))
    q_THh = rng.standard_normal((T, G * KV, HD), np.float32)
    q_THh[j] = q_Hh
    below_S = (np.arange(capacity) < start)[:, None, None]
    caches = [jnp.asarray(np.stack([other_layer_SKh[:capacity],
                                    np.where(below_S, x[:capacity], np.nan)])[:, None], dtype)
              for x in (k_XKh, v_XKh)]
    args = (jnp.asarray(q_THh[None], dtype), jnp.asarray(k_XKh[None, start:start + T], dtype),
            jnp.asarray(v_XKh[None, start:start + T], dtype), *caches, jnp.int32(1),
            jnp.int32(start))
    out = pallas[num_rows](*args)
    m_PKX, _, _ = jax.eval_shape(functools.partial(attention_pallas.split_stats,
                                                   interpret=INTERPRET), *args)
    assert m_PKX.shape[0] == capacity // split
    return np.asarray(out[0, j])

  # Across key blocks and split boundaries (64, 128, 256); the half capacity where it fits.
  for p in (64, 200, 263):
    row_0 = run(p, 0, S)
    assert not np.isnan(row_0).any(), p
    assert np.array_equal(run(p, 0, S, num_rows=1), row_0), p
    for j in (1, 7, 15):
      assert np.array_equal(run(p, j, S), row_0), (p, j)
      for num_rows in (2, 9, 16):
        if j < num_rows:
          assert np.array_equal(run(p, j, S, num_rows), row_0), (p, j, num_rows)
    for capacity in (S // 2, 2 * S):
      if p + T <= capacity:
        assert np.array_equal(run(p, 0, capacity), row_0), (p, capacity)


def test_the_fold_reads_only_the_splits_written():
  """Interpret mode fills the kernel's outputs with NaN first: the splits holding a position
  the chunk sees are written in full, the ones after it not at all, and the fold, reading
  only the former, gives bit for bit what it gives reading every split with the latter as
  "nothing seen" (m = -inf, l = 0, o = 0). Also two row blocks (G = 8) and hd = 128."""
  T, G, hd, S, start = 16, 8, 128, 1024, 300
  rng = _rng('written')
  q, k, v = (jnp.asarray(rng.standard_normal((1, T, n, hd)), jnp.float32) for n in (G * KV, KV, KV))
  cache_k, cache_v = (jnp.asarray(rng.standard_normal((LAYERS, 1, S, KV, hd)), jnp.float32)
                      for _ in range(2))
  args = (q, k, v, cache_k, cache_v, jnp.int32(LAYER), jnp.int32(start))
  stats = jax.jit(functools.partial(attention_pallas.split_stats, interpret=INTERPRET))(*args)
  m_PKX, l_PKX, o_PKXh = map(np.asarray, stats)
  seen = -(-(start + T) // attention_pallas.split_size(KV))  # splits holding a position seen
  assert 1 < seen < m_PKX.shape[0] == S // attention_pallas.split_size(KV)
  assert m_PKX.shape[2] > attention_pallas.MAX_ROW_BLOCK
  for stat in (m_PKX, l_PKX, o_PKXh):
    assert not np.isnan(stat[:seen]).any()
    assert np.isnan(stat[seen:]).all() or not INTERPRET  # natively, unwritten is not NaN
  fold = jax.jit(functools.partial(attention_pallas.fold, num_tokens=T, num_heads=G * KV,
                                   interpret=INTERPRET))
  nothing = (np.full_like(m_PKX[seen:], -np.inf), np.zeros_like(l_PKX[seen:]),
             np.zeros_like(o_PKXh[seen:]))
  every = [np.concatenate([stat[:seen], empty]) for stat, empty in zip(stats, nothing)]
  for got, want in zip(fold(*stats, start + T), fold(*every, S)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with jax.default_matmul_precision('highest'):
    out = jax.jit(functools.partial(attention_pallas.cache_attention_pallas,
                                    interpret=INTERPRET))(*args)
    ref = np.asarray(attention.cache_attention(*args))
  assert np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref) < 1e-5


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
# Rows T * G: 1 padded to 16, 48 padded to 64, 80 in two row blocks.
@pytest.mark.parametrize('T,G', [(1, 1), (16, 3), (20, 4)])
def test_prefix_attention_matches_reference(dtype, tol, T, G):
  """T pseudo-tokens at `pos`, each seeing the cache below it and its own key (none before
  position 0: its own key alone); the cache from `pos` on is NaN for the kernel, which never
  reads it, and finite garbage for the reference, which weighs it by zero."""
  S = 384
  for pos in STARTS:
    q, k, v, cache_k, cache_v = _case(_rng('prefix', dtype, T, G, pos), dtype, T, G, S, pos,
                                      GARBAGE)
    below_S = (jnp.arange(S) < pos)[:, None, None]
    nan_k, nan_v = (jnp.where(below_S, c, jnp.nan) for c in (cache_k, cache_v))
    with jax.default_matmul_precision('highest'):
      traced, static, _ = _kernel_and_reference(q, k, v, nan_k, nan_v, jnp.int32(LAYER),
                                                jnp.int32(pos), static_layer=LAYER, prefix=True)
      _, _, ref = _kernel_and_reference(q, k, v, cache_k, cache_v, jnp.int32(LAYER),
                                        jnp.int32(pos), static_layer=LAYER, prefix=True)
    _assert_close((traced, static), ref, (1, T, G * KV * HD), dtype, tol, pos)


@pytest.mark.parametrize('kernel', [
    attention.cache_attention,
    functools.partial(attention_pallas.cache_attention_pallas, interpret=INTERPRET)],
    ids=['jnp', 'pallas'])
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize('first_row,pos_back', [(5, 0), (5, 3), (1, 130), (15, 299)])
def test_riders_see_the_prefix_and_themselves(kernel, dtype, tol, first_row, pos_back):
  """A chunk of 16 rows whose rows from `first_row` on are riders at `start - pos_back`: its
  tokens' rows are bit for bit what they are without riders, and each rider's row is what
  the DP's prefix attention computes for it (the cache below its position, its own key)."""
  T, G, S, start = 16, 3, 384, 300
  pos = start - pos_back
  q, k, v, cache_k, cache_v = _case(_rng('riders', dtype, first_row, pos), dtype, T, G, S,
                                    start, GARBAGE)
  riders = attention.Riders(first_row, jnp.int32(pos))
  run = jax.jit(kernel)
  with jax.default_matmul_precision('highest'):
    ridden = run(q, k, v, cache_k, cache_v, LAYER, jnp.int32(start), riders)
    alone = run(q, k, v, cache_k, cache_v, LAYER, jnp.int32(start))
    rows = slice(first_row, T)
    prefix = attention.prefix_attention(q[:, rows], k[:, rows], v[:, rows], cache_k, cache_v,
                                        LAYER, jnp.int32(pos))
  np.testing.assert_array_equal(np.asarray(ridden[:, :first_row], np.float32),
                                np.asarray(alone[:, :first_row], np.float32))
  _assert_close((ridden[:, rows],), prefix, prefix.shape, dtype, tol, (first_row, pos))


def test_a_program_traces_the_kernel_once_and_is_unchanged_by_it(monkeypatch):
  """The accelerator path calls the kernel once per layer; it is traced once per program, and
  the program is the one the kernel traced at every layer would build."""
  config = tiny.tiny_config()
  params = tiny.tiny_params(config)

  def decoder():
    return Decoder(params, config, strategies.Vanilla(), fast_path=True, attention='pallas')

  def program():
    """Its lines, sorted and with the values' names taken out: jax 0.11 may print a constant
    before or after a reshape, which renames the values after it (natively the texts
    differed so)."""
    text = decoder().lower(20, 8, 'cuda')['plain'].as_text(debug_info=False)
    return sorted(re.sub(r'%[\w#.]+', '%', line) for line in text.splitlines())

  traces = []
  split_stats = attention_pallas.split_stats
  monkeypatch.setattr(attention_pallas, 'split_stats',
                      lambda *a, **k: traces.append(1) or split_stats(*a, **k))
  jax.clear_caches()
  once = program()
  assert len(traces) == 1 and config.num_layers > 1
  monkeypatch.setattr(attention_pallas, 'cache_attention_pallas',
                      attention_pallas.cache_attention_pallas.__wrapped__)
  assert program() == once
  assert len(traces) == 1 + config.num_layers


@pytest.mark.parametrize('kernel', [
    attention.cache_attention,
    functools.partial(attention_pallas.cache_attention_pallas, interpret=INTERPRET)],
    ids=['jnp', 'pallas'])
@pytest.mark.parametrize('T,G,num_rows', [(16, 3, 1), (16, 4, 9), (16, 8, 3), (4, 1, 3)])
def test_padding_rows_come_out_as_zeros(kernel, T, G, num_rows):
  """With `num_rows`, the real rows are bit for bit what the whole chunk gives them and the
  padding rows are zeros (packed q/k/v, as the model passes them)."""
  S, start = 384, 300
  q, k, v, cache_k, cache_v = _case(_rng('padding', T, G, num_rows), jnp.bfloat16, T, G, S,
                                    start, GARBAGE)
  packed_BTnNh = jnp.concatenate([q, k, v], axis=2)[:, :, None]
  args = (packed_BTnNh, None, None, cache_k, cache_v, LAYER, jnp.int32(start))
  whole = jax.jit(kernel)(*args)
  real = jax.jit(functools.partial(kernel, num_rows=num_rows))(*args)
  np.testing.assert_array_equal(np.asarray(real[:, :num_rows], np.float32),
                                np.asarray(whole[:, :num_rows], np.float32))
  assert not np.asarray(real[:, num_rows:], np.float32).any()


@pytest.mark.parametrize('prefix', [False, True])
def test_packed_qkv_gives_the_three_arrays_results(prefix):
  """q, k and v packed into one array (k and v None; `attention.split_packed`) give the kernel,
  and the reference, bit for bit what the three arrays give (the kernel reads the packed
  array in place; a chunk across a key block, past a split)."""
  T, G, S, start = 16, 3, 384, 300
  q, k, v, cache_k, cache_v = _case(_rng('packed', prefix), jnp.bfloat16, T, G, S, start, GARBAGE)
  packed_BTnNh = jnp.concatenate([q, k, v], axis=2)[:, :, None]  # one shard
  for apart, together in zip(
      _kernel_and_reference(q, k, v, cache_k, cache_v, jnp.int32(LAYER), jnp.int32(start),
                            static_layer=LAYER, prefix=prefix),
      _kernel_and_reference(packed_BTnNh, None, None, cache_k, cache_v, jnp.int32(LAYER),
                            jnp.int32(start), static_layer=LAYER, prefix=prefix)):
    np.testing.assert_array_equal(np.asarray(together, np.float32),
                                  np.asarray(apart, np.float32))


def test_split_packed_takes_each_shards_heads():
  """Packed for two shards, shard i holding [q_i k_i v_i]: q, k and v come back with the
  heads in order (shard 0's, then shard 1's)."""
  H, KV_, hd = 4, 2, 3
  q, k, v = (jnp.arange(n * hd).reshape(1, 1, n, hd) + base
             for n, base in ((H, 0), (KV_, 100), (KV_, 200)))
  per_shard = [jnp.concatenate([x.reshape(1, 1, 2, -1, hd)[:, :, i] for x in (q, k, v)], axis=2)
               for i in range(2)]
  got = attention.split_packed(jnp.stack(per_shard, axis=2), KV_)
  for a, b in zip(got, (q, k, v)):
    np.testing.assert_array_equal(a, b)
