"""The CPU product kernel: against float64 products, its rows' independence, where it applies,
and the decoders that run it.

The row tests compare with np.array_equal: the kernel sums each output element in one order
whatever the rows (see `cpu_product.cc`), so a row's result may not depend on the others.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clasp_jax import cpu_product
from clasp_jax import strategies
from clasp_jax.engine import Decoder
import tiny

pytestmark = pytest.mark.skipif(jax.default_backend() != 'cpu', reason='a CPU kernel')

# Column ranges of whole vectors (16 lanes on AVX-512), a last range of whole vectors then
# single columns, fewer columns than a vector, and SmolLM2-135M's k/v, o and down shapes.
SHAPES = ((64, 256), (96, 200), (100, 77), (7, 5), (576, 192), (576, 576), (1536, 576))


def _case(R, K, N):
  rng = np.random.default_rng(R * 100003 + K * 1009 + N)
  return (rng.standard_normal((R, K)).astype(np.float32),
          rng.standard_normal((K, N)).astype(np.float32))


@pytest.mark.parametrize('K, N', SHAPES)
@pytest.mark.parametrize('R', [1, 2, 3, 5])
def test_kernel_computes_the_product(R, K, N):
  x_RK, w_KN = _case(R, K, N)
  out_RN = np.asarray(jax.jit(cpu_product.kernel_product)(x_RK, w_KN))
  exact_RN = x_RK.astype(np.float64) @ w_KN.astype(np.float64)
  # float32 sums of K terms of size ~1: within K ulps of sqrt(K)-sized results.
  np.testing.assert_allclose(out_RN, exact_RN, rtol=0, atol=K * 2e-7 * np.sqrt(K))


@pytest.mark.parametrize('K, N', SHAPES)
def test_a_rows_result_does_not_depend_on_the_other_rows(K, N):
  x_RK, w_KN = _case(3, K, N)
  product = jax.jit(cpu_product.kernel_product)
  out_3N = np.asarray(product(x_RK, w_KN))
  for r in range(3):
    np.testing.assert_array_equal(out_3N[r], np.asarray(product(x_RK[r:r + 1], w_KN))[0])
  np.testing.assert_array_equal(np.asarray(product(x_RK[1:], w_KN)), out_3N[1:])
  np.testing.assert_array_equal(np.asarray(product(x_RK, w_KN)), out_3N)  # threads race not


def test_kernel_takes_leading_axes():
  x_RK, w_KN = _case(3, 64, 256)
  out_13N = jax.jit(cpu_product.kernel_product)(x_RK.reshape(1, 3, 64), w_KN)
  assert out_13N.shape == (1, 3, 256)
  np.testing.assert_array_equal(np.asarray(out_13N)[0],
                                np.asarray(jax.jit(cpu_product.kernel_product)(x_RK, w_KN)))


@pytest.mark.parametrize('rows, dtype, on, applies', [
    (3, jnp.float32, None, True),
    (2, jnp.float32, True, True),
    (1, jnp.float32, None, True),  # a plain step where rows are computed apart
    (4, jnp.float32, None, False),  # wider passes compute: XLA's products
    (3, jnp.bfloat16, None, False),
    (3, jnp.float32, False, False),
])
def test_where_the_kernel_applies(rows, dtype, on, applies):
  x_RK = jnp.zeros((rows, 64), dtype)
  w_KN = jnp.zeros((64, 128), dtype)
  with cpu_product.use_kernel(on):
    assert cpu_product.applies(x_RK, w_KN) == applies
    # A function of its own: jit keeps a trace whatever the choice it was made under.
    text = jax.jit(lambda x, w: cpu_product.product(x, w)).lower(x_RK, w_KN).as_text()
  assert ('clasp_jax_rows_product' in text) == applies


def _program_text(decoder):
  return decoder.lower(20, 8, platform='cpu')['draft'].as_text()


def test_a_decoder_multiplies_as_it_chose():
  config = tiny.tiny_config()
  params = tiny.tiny_params(config)
  strategy = strategies.StaticSkip(skip_layers=(1,), num_draft_tokens=2)
  texts = {on: _program_text(Decoder(params, config, strategy, pass_width=3, cpu_kernel=on))
           for on in (None, False)}
  assert 'clasp_jax_rows_product' in texts[None]
  assert 'clasp_jax_rows_product' not in texts[False]


def test_drafting_equals_plain_decoding_with_either_products():
  config = tiny.tiny_config()
  params = tiny.tiny_params(config)
  prompts = tiny.prompts(config, count=2)
  for on in (None, False):
    plain = Decoder(params, config, strategies.Vanilla(), pass_width=3, cpu_kernel=on)
    static = Decoder(params, config, strategies.StaticSkip(skip_layers=(1,), num_draft_tokens=2),
                     pass_width=3, cpu_kernel=on)
    for prompt in prompts:
      assert static.generate(prompt, 12).token_ids == plain.generate(prompt, 12).token_ids


def test_the_kernel_is_built_once_into_its_cache_folder(monkeypatch, tmp_path):
  monkeypatch.setenv('CLASP_JAX_CACHE', str(tmp_path))
  cpu_product.available.cache_clear()
  try:
    assert cpu_product.available()
    built = list(tmp_path.glob('cpu_kernels-*.so'))
    assert len(built) == 1 and not list(tmp_path.glob('tmp*'))  # no half-built leftovers
    mtime = built[0].stat().st_mtime_ns
    cpu_product.available.cache_clear()
    assert cpu_product.available() and built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt
    x_RK, w_KN = _case(3, 64, 256)
    np.testing.assert_allclose(np.asarray(jax.jit(cpu_product.kernel_product)(x_RK, w_KN)),
                               x_RK @ w_KN, rtol=1e-5, atol=1e-4)
  finally:
    cpu_product.available.cache_clear()


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
  """A machine without a C++ compiler and without a built kernel."""
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  monkeypatch.setenv('CLASP_JAX_CACHE', str(tmp_path / 'cache'))
  cpu_product.available.cache_clear()
  yield
  cpu_product.available.cache_clear()


def test_without_a_compiler_products_are_xlas(no_compiler, caplog):
  x_RK, w_KN = _case(3, 64, 256)
  with caplog.at_level(logging.WARNING):
    assert not cpu_product.applies(x_RK, w_KN)
  assert 'could not be built' in caplog.text
  np.testing.assert_array_equal(np.asarray(cpu_product.product(x_RK, w_KN)),
                                np.asarray(jnp.asarray(x_RK) @ w_KN))


def test_asking_for_the_kernel_without_a_compiler_is_a_clear_error(no_compiler):
  config = tiny.tiny_config()
  with pytest.raises(ValueError, match='kernel could not be built'):
    Decoder(tiny.tiny_params(config), config, strategies.Vanilla(), cpu_kernel=True)


def test_a_mesh_multiplies_by_xla():
  config = tiny.tiny_config()
  params = tiny.tiny_params(config)
  decoder = Decoder(params, config, strategies.Vanilla(), pass_width=3, mesh='tp:1')
  assert 'clasp_jax_rows_product' not in decoder.lower(20, 8, platform='cpu')['plain'].as_text()
  with pytest.raises(ValueError, match='a mesh shards the products'):
    Decoder(params, config, strategies.Vanilla(), mesh='tp:1', cpu_kernel=True)
