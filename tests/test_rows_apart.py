"""Passes that compute their rows apart (`Decoder`'s `rows_apart`, a CPU in float32): a 3-row
pass's rows against 1-row passes of their tokens, bit for bit, and which decoders do it
(`tests/test_attention.py` tests the attention kernel alone).

The equalities are exact (np.array_equal): a decoder that runs its plain steps as 1-row
passes and its verify passes 3 rows wide commits plain decoding's tokens only if a row's
bits do not depend on the rows beside it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clasp_jax import cpu_attention
from clasp_jax import cpu_product
from clasp_jax import engine
from clasp_jax import model as model_lib
from clasp_jax import strategies
from clasp_jax import xla_options
from clasp_jax.cache import init_cache
from clasp_jax.engine import Decoder
import tiny

pytestmark = pytest.mark.skipif(jax.default_backend() != 'cpu', reason='a CPU in float32')


def _jit(fn):
  """`fn` jitted as a decoder's programs are: the CPU's compiler options, float32 products at
  full precision, the kernel's products (traced here, under those settings)."""
  jitted = jax.jit(fn, compiler_options=xla_options.compiler_options())

  def run(*args):
    with jax.default_matmul_precision('highest'), cpu_product.use_kernel(True):
      return jitted.lower(*args).compile()(*args)
  return run


@pytest.mark.parametrize('per_layer', [True, False])
@pytest.mark.parametrize('context', [20, 126, 128, 300])
def test_a_3_row_pass_computes_each_row_as_a_1_row_pass(per_layer, context):
  """In either layout, after a prompt of `context` tokens (126: the 3 rows straddle an
  attention block), the hidden states of every layer, the keys and values written and each
  row's logits of one 3-row pass equal those of three 1-row passes, one after the other."""
  config = tiny.tiny_config()
  params = tiny.tiny_params(config)
  if per_layer:
    params = model_lib.unstack_layers(params)
  prompt_P = jnp.asarray(tiny.prompts(config, count=1, length=context)[0], jnp.int32)
  tokens_T = jnp.asarray([11, 42, 7], jnp.int32)
  cache = model_lib.forward(params, config, prompt_P[None],
                            init_cache(config, context + 8)).cache
  full_pass = functools.partial(engine.full_pass, params, config,
                                attention=cpu_attention.row_attention, logits=False)

  def one_pass(cache):
    _, hiddens_LTD, cache, _ = full_pass(tokens_T, cache, width=3)
    return hiddens_LTD, engine.row_logits(params, config, hiddens_LTD), cache

  def row_passes(cache):
    hiddens, logits = [], []
    for t in range(3):
      _, hiddens_L1D, cache, _ = full_pass(tokens_T[t:t + 1], cache, width=1)
      hiddens.append(hiddens_L1D)
      logits.append(engine.row_logits(params, config, hiddens_L1D)(0))
    return jnp.concatenate(hiddens, axis=1), jnp.stack(logits), cache

  def run(fn, cache):
    hiddens_LTD, logits, cache = fn(cache)
    if callable(logits):
      logits = jnp.stack([logits(t) for t in range(3)])
    rows = slice(context, context + 3)
    return hiddens_LTD, logits, cache.k_LBSKh[:, :, rows], cache.v_LBSKh[:, :, rows]

  together = _jit(functools.partial(run, one_pass))(cache)
  apart = _jit(functools.partial(run, row_passes))(cache)
  for name, a, b in zip(('hidden states', 'logits', 'keys', 'values'), together, apart):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_a_cpu_decoder_takes_its_plain_steps_one_row_wide():
  config = tiny.tiny_config()
  decoder = Decoder(tiny.tiny_params(config), config, strategies.Vanilla())
  assert decoder.rows_apart and decoder.pass_width == 3 and decoder.plain_width == 1
  off = Decoder(tiny.tiny_params(config), config, strategies.Vanilla(), rows_apart=False)
  assert not off.rows_apart and off.plain_width == 3


@pytest.mark.parametrize('settings, reason', [
    (dict(dtype=jnp.bfloat16), 'compute float32, not bfloat16'),
    (dict(cpu_kernel=False), 'kernels are off'),
    (dict(logits_by_row=False), 'logits_by_row is off'),
    (dict(pass_width=1), 'a pass width of 1'),
    (dict(pass_width=4), 'a pass width of 4'),
    (dict(mesh='tp:1'), 'a mesh'),
    (dict(attention='pallas'), 'the fused GPU kernel'),
    (dict(config=dict(head_dim=8)), 'heads of a multiple of 16, not 8'),
])
def test_where_rows_cannot_be_apart_a_decoder_says_why(settings, reason):
  """Unasked, such a decoder keeps its plain steps `pass_width` rows wide; asked, it says why
  it cannot at construction."""
  settings = dict(settings)
  config = tiny.tiny_config(**settings.pop('config', {}))
  params = tiny.tiny_params(config)
  dtype = settings.pop('dtype', None)
  if dtype is not None:
    params = jax.tree.map(lambda x: x.astype(dtype), params)
  decoder = Decoder(params, config, strategies.Vanilla(), **settings)
  assert not decoder.rows_apart and decoder.plain_width == decoder.pass_width
  with pytest.raises(ValueError, match=f'rows_apart=True, but .*{reason}'):
    Decoder(params, config, strategies.Vanilla(), rows_apart=True, **settings)


@pytest.mark.parametrize('method, settings', [
    ('vanilla', {}),
    ('pld', {}),
    ('static', dict(skip_layers=2)),
    ('clasp', dict(skip_layers=2, num_draft_tokens=1)),  # the DP's riders in the verify pass
    ('clasp', dict(skip_layers=2, num_draft_tokens=4)),  # verify passes of 2 x 3 rows
])
def test_drafting_with_rows_apart_equals_plain_decoding_at_one_row(method, settings):
  """Every method's tokens equal those of plain decoding whose every pass is 1 row wide
  (`pass_width=1`), which the rows-apart decoders' plain steps are."""
  config = tiny.tiny_config()
  params = tiny.tiny_params(config)
  reference = Decoder(params, config, strategies.Vanilla(), pass_width=1)
  decoder = Decoder(params, config, strategies.build(method, config, **settings))
  assert decoder.rows_apart
  for prompt in tiny.prompts(config, count=2, length=130):
    assert (decoder.generate(prompt, tiny.MAX_NEW).token_ids
            == reference.generate(prompt, tiny.MAX_NEW).token_ids)
