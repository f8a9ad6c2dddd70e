"""A prompt's one-pass prefill through `attention.prompt_attention` (cuDNN's fused attention on
a GPU; XLA's `jax.nn.dot_product_attention` here): what it computes, and where the engine
uses it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from clasp_jax import attention, engine, strategies
from clasp_jax.engine import Decoder

#: cuDNN's kernel where it runs (a GPU, 16-bit floats), else XLA's.
ON_GPU = jax.default_backend() == 'gpu'


def _implementation(dtype) -> str:
  return 'cudnn' if attention.fused_prompt_attention_runs(64, dtype) else 'xla'


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize('G', [1, 3])
@pytest.mark.parametrize('packed', [False, True], ids=['three_arrays', 'packed'])
def test_matches_the_cache_attention_at_position_zero(dtype, tol, G, packed):
  """At position 0 it gives `cache_attention`'s output (to the dtype's rounding) without
  reading the cache: it runs on a cache of NaN, which the reference, merging the cache's
  rows past the chunk, is given finite."""
  KV, hd, T, S = 2, 64, 48, 256
  rng = np.random.default_rng(G)
  q_BTHh, k_BTKh, v_BTKh = (jnp.asarray(rng.standard_normal((1, T, n, hd)), dtype)
                            for n in (G * KV, KV, KV))
  finite_LBSKh = jnp.asarray(rng.standard_normal((2, 1, S, KV, hd)), dtype)
  nan_LBSKh = jnp.full_like(finite_LBSKh, jnp.nan)
  if packed:  # one shard: q heads, then k, then v
    inputs = (jnp.concatenate([q_BTHh, k_BTKh, v_BTKh], axis=2)[:, :, None], None, None)
  else:
    inputs = (q_BTHh, k_BTKh, v_BTKh)
  with jax.default_matmul_precision('highest'):
    want = attention.cache_attention(*inputs, finite_LBSKh, finite_LBSKh, 1, jnp.int32(0))
    got = jax.jit(functools.partial(attention.prompt_attention,
                                    implementation=_implementation(dtype)))(
                                        *inputs, nan_LBSKh, nan_LBSKh, 1, jnp.int32(0))
  assert got.shape == (1, T, G * KV * hd) and got.dtype == dtype
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert not np.isnan(got).any()
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < tol


def test_riders_are_refused():
  x = jnp.zeros((1, 4, 2, 16))
  with pytest.raises(ValueError, match='no riders'):
    attention.prompt_attention(x, x, x, x[None], x[None], 0, 0,
                               attention.Riders(2, jnp.int32(0)))


@pytest.mark.parametrize('name', ['auto', 'xla', 'pallas'])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_the_fused_kernels_resolve_to_it_where_cudnn_takes_the_model(name, dtype):
  """'auto' (on a GPU) and 'pallas' give the prompt attention where cuDNN takes the heads in
  the dtype; 'xla', or a machine without it, the cache attention (None)."""
  config = tiny.tiny_config(head_dim=64)
  fused = name == 'pallas' or (name == 'auto' and ON_GPU)
  want = fused and attention.fused_prompt_attention_runs(64, dtype)
  got = engine.resolve_prompt_attention(name, config, dtype)
  assert got is (attention.prompt_attention if want else None)
  if not ON_GPU:
    assert got is None


@pytest.fixture(name='fused_prefill')
def _fused_prefill(monkeypatch):
  """Decoders made inside prefill a prompt in one pass through the prompt attention (XLA's
  off a GPU), as a GPU's decoders do through cuDNN's."""
  monkeypatch.setattr(engine, 'resolve_prompt_attention', lambda *args: functools.partial(
      attention.prompt_attention, implementation=_implementation(jnp.float32)))


def test_a_one_pass_prefill_attends_through_it_and_every_method_starts_alike(
    tiny_model, fused_prefill):
  """The prefill's cache and hidden states are the cache attention's to float32 rounding,
  though not bit for bit (so the prompt attention is what ran), and every method, sharing the
  prefill, still decodes plain decoding's tokens."""
  del fused_prefill
  config, params = tiny_model
  prompt = tiny.prompts(config, count=1, length=100)[0]
  methods = {name: Decoder(params, config, strategies.build(name, config, **kwargs))
             for name, kwargs in (('vanilla', {}), ('pld', {}),
                                  ('static', dict(skip_set=(1, 3))))}
  fused = methods['vanilla'].start(prompt, 8)
  with pytest.MonkeyPatch.context() as undo:
    undo.setattr(engine, 'resolve_prompt_attention', lambda *args: None)
    blocked = Decoder(params, config, strategies.Vanilla()).start(prompt, 8)
  k_fused, k_blocked = (np.asarray(s.cache.k_LBSKh[:, :, :100]) for s in (fused, blocked))
  np.testing.assert_allclose(k_fused, k_blocked, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(fused.target_hidden_LD, blocked.target_hidden_LD,
                             rtol=1e-4, atol=1e-4)
  assert not np.array_equal(k_fused, k_blocked)
  tokens = {name: d.generate(prompt, tiny.MAX_NEW).token_ids for name, d in methods.items()}
  assert tokens['pld'] == tokens['static'] == tokens['vanilla']


def test_a_prompt_in_chunks_attends_through_the_cache_attention(tiny_model, fused_prefill,
                                                                monkeypatch):
  """A prompt run as passes of a chunk (a CPU's long prompts) is untouched by it: later
  chunks read the cache, so every pass keeps the cache attention."""
  del fused_prefill
  config, params = tiny_model
  monkeypatch.setattr(engine, 'prefill_chunk', lambda: 32)
  prompt = tiny.prompts(config, count=1, length=100)[0]
  with_it = Decoder(params, config, strategies.Vanilla()).start(prompt, 8)
  monkeypatch.setattr(engine, 'resolve_prompt_attention', lambda *args: None)
  without = Decoder(params, config, strategies.Vanilla()).start(prompt, 8)
  np.testing.assert_array_equal(with_it.cache.k_LBSKh, without.cache.k_LBSKh)
