"""The plain `jnp` cache attention: its 1-row path beside its chunk path, and what its CPU
programs are made of (`attention`'s module docstring says why each path is laid out so)."""

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clasp_jax import attention
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


ON_CPU = pytest.mark.skipif(jax.default_backend() != 'cpu', reason="XLA:CPU's programs")


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
