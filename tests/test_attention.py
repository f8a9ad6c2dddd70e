"""The plain `jnp` cache attention: its row path (each row apart) beside its chunk path, the
CPU kernel (`cpu_attention`) beside the row path, and what the CPU programs are made of
(`attention`'s module docstring says why each path is laid out so)."""

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clasp_jax import attention
from clasp_jax import cpu_attention
from clasp_jax import xla_options

LAYERS, S, KV, G, HD = 2, 384, 2, 3, 16
LAYER = 1
# Inside the first block, at and across block (128) boundaries, in the last block.
STARTS = (0, 5, 127, 128, 200, 383)


def _case(dtype, T, start):
  """Random roped q, k, v of a chunk at `start` and [L, 1, S, KV, hd] caches."""
  rng = np.random.default_rng(zlib.crc32(repr((T, start, str(dtype))).encode()))

  def normal(*shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
  return (normal(1, T, KV * G, HD), normal(1, T, KV, HD), normal(1, T, KV, HD),
          normal(LAYERS, 1, S, KV, HD), normal(LAYERS, 1, S, KV, HD))


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize('start', STARTS[:-1])
def test_a_one_row_chunk_attends_as_a_wider_chunks_first_row(dtype, tol, start):
  """The 1-row path gives its query what the chunk path gives the same query as the first row
  of a 2-row chunk, up to rounding: the cache below `start`, its own key, its GQA heads."""
  q_1THh, k_1TKh, v_1TKh, cache_k, cache_v = _case(dtype, 2, start)
  attend = jax.jit(attention.cache_attention, static_argnums=5)
  with jax.default_matmul_precision('highest'):
    pair_1TX = attend(q_1THh, k_1TKh, v_1TKh, cache_k, cache_v, LAYER, jnp.int32(start))
    row_11X = attend(q_1THh[:, :1], k_1TKh[:, :1], v_1TKh[:, :1], cache_k, cache_v, LAYER,
                     jnp.int32(start))
  np.testing.assert_allclose(np.asarray(row_11X, np.float32),
                             np.asarray(pair_1TX[:, :1], np.float32), rtol=tol, atol=tol)


def _row_by_row(fn, q_1THh, k_1TKh, v_1TKh, cache_k, cache_v, start):
  """Each row of a T-row chunk's attention as a 1-row chunk of that row computes it, after
  the rows before it were written to the cache (as 1-row passes of those tokens would)."""
  rows = []
  for t in range(q_1THh.shape[1]):
    k_c, v_c = (c.at[LAYER, :, start:start + t].set(x[:, :t])
                for c, x in ((cache_k, k_1TKh), (cache_v, v_1TKh)))
    rows.append(fn(q_1THh[:, t:t + 1], k_1TKh[:, t:t + 1], v_1TKh[:, t:t + 1], k_c, v_c,
                   LAYER, jnp.int32(start + t)))
  return jnp.concatenate(rows, axis=1)


ON_CPU = pytest.mark.skipif(jax.default_backend() != 'cpu', reason="XLA:CPU's programs")
# The plain `jnp` row attention in both dtypes, and the CPU kernel (float32).
ROW_ATTENTIONS = [(attention.row_attention, jnp.float32), (attention.row_attention, jnp.bfloat16),
                  pytest.param(cpu_attention.row_attention, jnp.float32, marks=ON_CPU)]


@pytest.mark.parametrize('row_attention, dtype', ROW_ATTENTIONS)
@pytest.mark.parametrize('start', STARTS[:-1])
def test_row_attention_computes_each_row_as_a_chunk_of_it_alone(row_attention, dtype, start):
  """Bit for bit: a row's attention in a 3-row chunk does not depend on the other rows (the
  keys of the rows after it are merged into its blocks, and weigh exactly zero), so a decoder
  may run its plain steps as 1-row passes beside 3-row verify passes (`Decoder.rows_apart`)."""
  q_1THh, k_1TKh, v_1TKh, cache_k, cache_v = _case(dtype, 3, start)
  attend = jax.jit(row_attention, static_argnums=5)
  chunk_1TX = attend(q_1THh, k_1TKh, v_1TKh, cache_k, cache_v, LAYER, jnp.int32(start))
  rows_1TX = _row_by_row(attend, q_1THh, k_1TKh, v_1TKh, cache_k, cache_v, start)
  np.testing.assert_array_equal(np.asarray(chunk_1TX, np.float32),
                                np.asarray(rows_1TX, np.float32))
  # And it is the chunk's attention, up to rounding.
  with jax.default_matmul_precision('highest'):
    batched_1TX = jax.jit(attention.cache_attention, static_argnums=5)(
        q_1THh, k_1TKh, v_1TKh, cache_k, cache_v, LAYER, jnp.int32(start))
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(chunk_1TX, np.float32),
                             np.asarray(batched_1TX, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize('row_attention',
                         [attention.row_attention,
                          pytest.param(cpu_attention.row_attention, marks=ON_CPU)])
@pytest.mark.parametrize('start', [5, 200])
def test_row_attention_takes_riders_as_the_chunk_path_does(row_attention, start):
  """A verify pass with the CLaSp DP's riders in its last row: the real rows as without
  riders, bit for bit; the rider (at position `pos`: the cache below it, its own key) as the
  chunk path computes it, up to rounding."""
  q_1THh, k_1TKh, v_1TKh, cache_k, cache_v = _case(jnp.float32, 3, start)
  riders = attention.Riders(first_row=2, pos=jnp.int32(start - 3))
  attend = jax.jit(row_attention, static_argnums=5)
  with_1TX = attend(q_1THh, k_1TKh, v_1TKh, cache_k, cache_v, LAYER, jnp.int32(start), riders)
  without_1TX = attend(q_1THh, k_1TKh, v_1TKh, cache_k, cache_v, LAYER, jnp.int32(start))
  np.testing.assert_array_equal(np.asarray(with_1TX[:, :2]), np.asarray(without_1TX[:, :2]))
  with jax.default_matmul_precision('highest'):
    chunk_1TX = jax.jit(attention.cache_attention, static_argnums=5)(
        q_1THh, k_1TKh, v_1TKh, cache_k, cache_v, LAYER, jnp.int32(start), riders)
  np.testing.assert_allclose(np.asarray(with_1TX), np.asarray(chunk_1TX), rtol=1e-5,
                             atol=1e-5)


def _cpu_program(T: int) -> str:
  """The optimised CPU program of a T-row chunk's cache attention, as a decoder's programs
  compile it."""
  q_1THh, k_1TKh, v_1TKh, cache_k, cache_v = _case(jnp.float32, T, 200)
  fn = jax.jit(attention.cache_attention, static_argnums=5,
               compiler_options=xla_options.compiler_options())
  return fn.lower(q_1THh, k_1TKh, v_1TKh, cache_k, cache_v, LAYER,
                  jnp.int32(200)).compile().as_text()


def _block_copies(program: str) -> list[str]:
  """Copies and transposes of arrays the size of a key block."""
  block = str(attention.ATTENTION_BLOCK)
  return [line for line in program.splitlines()
          if re.search(r'= \w+\[[\d,]*\b' + block + r'\b[\d,]*\]\S* (copy|transpose)\(', line)]


@ON_CPU
def test_the_cpu_kernel_takes_a_batch_of_one():
  q_1THh, k_1TKh, v_1TKh, cache_k, cache_v = _case(jnp.float32, 1, 5)
  two = lambda x: jnp.concatenate([x, x])
  with pytest.raises(ValueError, match='a batch of one'):
    cpu_attention.row_attention(two(q_1THh), two(k_1TKh), two(v_1TKh), two(cache_k),
                                two(cache_v), LAYER, jnp.int32(5))


@ON_CPU
def test_a_cpu_one_row_step_copies_no_key_block():
  """On a CPU the 1-row path multiplies the blocks as they lie in the cache; a wider chunk's
  batched products copy them (which this test checks it sees)."""
  assert not _block_copies(_cpu_program(1))
  assert _block_copies(_cpu_program(2))


@ON_CPU
@pytest.mark.parametrize('T', [1, 2])
def test_cpu_programs_reduce_keys_without_windowed_reductions(T):
  """The reductions over a block's keys stay plain reductions on a CPU (`_reduce_keys`),
  never the windowed reductions XLA's tree-reduction rewrite turns them into."""
  assert 'reduce-window(' not in _cpu_program(T)
