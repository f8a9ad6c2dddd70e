"""Exact in bfloat16 too: a token's logits do not depend on the pass that computed them.

Plain decoding computes each token in a pass of its own; verification computes K+1 tokens in
one pass. If the two reached a token's logits through different reduction orders, near-ties
would flip and the drafting methods would part from plain decoding (in bfloat16 within a few
tokens). `engine.full_pass` makes every pass the same computation; these tests check it bit
for bit, layer by layer, and then token for token for every method, on the CPU in bfloat16.
"""

import contextlib
import functools
import itertools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clasp_jax import engine
from clasp_jax import model as model_lib
from clasp_jax import strategies
from clasp_jax.cache import init_cache
from clasp_jax.engine import Decoder
import tiny

pytestmark = pytest.mark.slow  # minutes in all on 2 cores: started first (conftest.py)


PROMPT_LEN = 20
NUM_TOKENS = 12


@functools.partial(jax.jit, static_argnames=('config', 'width'))
def _pass(params, config, tokens_T, cache, width):
  return engine.full_pass(params, config, tokens_T, cache, width=width,
                          attention=engine.resolve_attention('auto'))


@functools.partial(jax.jit, static_argnames=('config', 'width'))
def _pass_with_riders(params, config, tokens_T, cache, riders_FD, width):
  """`_pass` with riders (the CLaSp DP's candidates) in the rows past the tokens, each
  replaced by its own output between layers."""
  ride = model_lib.Ride(first_row=tokens_T.shape[0], pos=cache.length - 1, init_FD=riders_FD,
                        after=lambda a, rows, x_BTD, out_BTD: (out_BTD, out_BTD[0, rows]))
  return engine.full_pass(params, config, tokens_T, cache, width=width,
                          attention=engine.resolve_attention('auto'), ride=ride)


@functools.partial(jax.jit, static_argnames=('config',))
def _prefill(params, config, tokens_1P):
  return model_lib.forward(params, config, tokens_1P,
                           init_cache(config, 128, dtype=params["embed"].dtype)).cache


def _first_difference(a_LD, b_LD) -> str:
  """Where two stacks of per-layer hidden states first differ (h_0 is the embedding)."""
  for i, (a_D, b_D) in enumerate(zip(np.asarray(a_LD, np.float32), np.asarray(b_LD, np.float32))):
    if not np.array_equal(a_D, b_D):
      return f'first differing hidden state: h_{i} (max |diff| {np.max(np.abs(a_D - b_D)):.3g})'
  return 'hidden states equal'


#: The layer programs the pass-level checks run: the stacked loop, per-layer buffers as a CPU
#: runs them (a layer loop) and as accelerators do (unrolled, traced here with the CPU's loop
#: turned off).
LAYOUTS = ['stacked', 'per_layer', 'per_layer_unrolled']


def _in_layout(params, layout, monkeypatch, request):
  """`params` (stacked) in `layout`; for the unrolled program the CPU's layer loop is off for
  the test, and the module's jitted passes are traced afresh before and after it."""
  if layout == 'stacked':
    return params
  if layout == 'per_layer_unrolled':
    monkeypatch.setattr(model_lib, 'loops_over_layers', lambda: False)
    jax.clear_caches()
    request.addfinalizer(jax.clear_caches)
  return model_lib.unstack_layers(params)


def _plain_and_verified(params, config, width, starts=(0, 3, 7, NUM_TOKENS - 1)):
  """Each of NUM_TOKENS tokens after a shared prefill, as plain steps and as the rows of verify
  passes over the rest from a few starting tokens: {('plain' or start, token): (logits_V,
  hiddens_LD)}."""
  rng = np.random.RandomState(0)
  prompt_1P = jnp.asarray(rng.randint(4, config.vocab_size, (1, PROMPT_LEN)), jnp.int32)
  tokens_T = jnp.asarray(rng.randint(4, config.vocab_size, NUM_TOKENS), jnp.int32)
  results, cache = {}, _prefill(params, config, prompt_1P)
  for t in range(NUM_TOKENS):
    if t in starts:  # a pass over the rest, from the cache the plain steps wrote so far
      logits_TV, hiddens_LTD, _, _ = _pass(params, config, tokens_T[t:], cache, width)
      for row in range(NUM_TOKENS - t):
        results[(t, t + row)] = (logits_TV[row], hiddens_LTD[:, row])
    logits_TV, hiddens_LTD, cache, _ = _pass(params, config, tokens_T[t:t + 1], cache, width)
    cache = cache.rollback(PROMPT_LEN + t + 1)
    results[('plain', t)] = (logits_TV[0], hiddens_LTD[:, 0])
  return results


@pytest.mark.parametrize('width', [16, 4])  # one pass, and verify passes of several passes
@pytest.mark.parametrize('layout', LAYOUTS)
def test_logits_are_bit_equal_in_every_row_of_every_pass(tiny_model, width, layout, monkeypatch,
                                                         request):
  """bfloat16: token t's hidden states (every layer) and logits are bit-equal whether it was
  computed by a plain step or as any row of a verify pass that starts at any earlier token."""
  config, params = tiny_model
  params = _in_layout(jax.tree.map(lambda w: w.astype(jnp.bfloat16), params), layout,
                      monkeypatch, request)
  results = _plain_and_verified(params, config, width)
  mismatches = []
  for (start, t), (logits_V, hiddens_LD) in results.items():
    plain_V, plain_LD = results[('plain', t)]
    if start != 'plain' and not np.array_equal(np.asarray(logits_V), np.asarray(plain_V)):
      mismatches.append(f'token {t}, verify pass from token {start} (row {t - start}): '
                        + _first_difference(hiddens_LD, plain_LD))
  assert not mismatches, '\n'.join(mismatches)


@pytest.mark.parametrize('width,num_tokens,num_riders', [(16, 5, 11), (4, 6, 2)])
@pytest.mark.parametrize('layout', LAYOUTS)
def test_riders_leave_the_real_rows_bit_equal(tiny_model, width, num_tokens, num_riders,
                                              layout, monkeypatch, request):
  """bfloat16: a pass carrying riders in its padding rows computes its tokens' logits,
  hidden states and cached keys and values bit for bit as the same pass without them."""
  config, params = tiny_model
  params = _in_layout(jax.tree.map(lambda w: w.astype(jnp.bfloat16), params), layout,
                      monkeypatch, request)
  rng = np.random.RandomState(0)
  cache = _prefill(params, config,
                   jnp.asarray(rng.randint(4, config.vocab_size, (1, PROMPT_LEN)), jnp.int32))
  tokens_T = jnp.asarray(rng.randint(4, config.vocab_size, num_tokens), jnp.int32)
  riders_FD = jnp.asarray(rng.normal(size=(num_riders, config.hidden_size)), jnp.bfloat16)
  alone = _pass(params, config, tokens_T, cache, width)
  ridden = _pass_with_riders(params, config, tokens_T, cache, riders_FD, width)
  assert ridden[3].shape == (config.num_layers, num_riders, config.hidden_size)
  for a, b in [(alone[0], ridden[0]), (alone[1], ridden[1])]:
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  written = slice(PROMPT_LEN, PROMPT_LEN + num_tokens)
  for a, b in [(alone[2].k_LBSKh, ridden[2].k_LBSKh), (alone[2].v_LBSKh, ridden[2].v_LBSKh)]:
    np.testing.assert_array_equal(np.asarray(a[:, :, :written.stop], np.float32),
                                  np.asarray(b[:, :, :written.stop], np.float32))


def test_the_check_can_fail(tiny_model):
  """Passes of different widths do reach different bits in bfloat16 (so equality above is
  the pass width's doing, not an accident of the model)."""
  config, params = tiny_model
  params = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
  wide = _plain_and_verified(params, config, 16, starts=(0,))
  narrow = _plain_and_verified(params, config, 1, starts=(0,))
  assert any(not np.array_equal(np.asarray(wide[k][0]), np.asarray(narrow[k][0]))
             for k in wide if k[0] != 'plain')


@pytest.mark.parametrize('width,num_tokens,riders,want', [
    (16, 1, False, [1]),  # a plain step: one real row of 16
    (16, 9, False, [9]),  # a verify pass
    (16, 16, False, [None]),  # no padding
    (4, 6, False, [None, 2]),  # two passes, the last padded
    (16, 5, True, [None])])  # riders fill the padding
def test_a_pass_tells_the_attention_its_real_rows(tiny_model, width, num_tokens, riders, want):
  """Each pass of `full_pass` gives the attention the number of its real rows (`num_rows`)
  where padding follows them and no rider rides in it, so that the fused kernel can skip it."""
  config, params = tiny_model
  seen = []

  def attention(*args, num_rows=None):
    seen.append(num_rows)
    return engine.resolve_attention('xla')(*args, num_rows=num_rows)

  cache = init_cache(config, 64, dtype=params['embed'].dtype)
  tokens_T = jnp.arange(num_tokens, dtype=jnp.int32) + 4
  ride = None
  if riders:
    ride = model_lib.Ride(first_row=num_tokens, pos=jnp.int32(0),
                          init_FD=jnp.zeros((width - num_tokens, config.hidden_size)),
                          after=lambda a, rows, x_BTD, out_BTD: (out_BTD, out_BTD[0, rows]))
  jax.eval_shape(lambda: engine.full_pass(params, config, tokens_T, cache, width=width,
                                          attention=attention, ride=ride))
  assert [n for n, _ in itertools.groupby(seen)] == want  # a layer loop traces one layer


@pytest.mark.parametrize('packed', [False, True])
def test_a_layer_attends_to_the_keys_and_values_it_caches(tiny_model, packed):
  """The attention and the cache write take one computation of a layer's keys and values.

  On an H200 at the LLaMA-3-8B shape XLA fused the roped keys into both consumers, each
  fusion summing the split-K partials on its own, and a later pass then attended to keys that
  differed in a bit from those the verify pass saw (scripts/check_determinism.py found it; the
  CPU here does not show it). So this checks the structure that rules it out: what `decoder_layer`
  hands the attention and returns for the cache comes out of one optimization barrier, with
  q/k/v unfused (three arrays) and fused (one packed array, k and v sliced from it)."""
  config, params = tiny_model
  lp = model_lib.layer_params(model_lib.unstack_layers(params) if packed else params, 0)
  assert ('w_qkv' in lp) == packed
  handed = {}

  def attend(q_BTHh, k_BTKh, v_BTKh):
    handed['args'] = (q_BTHh, k_BTKh, v_BTKh)
    return jnp.zeros(q_BTHh.shape[:2] + (config.num_heads * config.head_dim,), q_BTHh.dtype)

  def layer_kv(x_BTD):
    cos_BTh, sin_BTh = model_lib.rope_tables(config, jnp.arange(4)[None])
    _, k_BTKh, v_BTKh = model_lib.decoder_layer(lp, config, x_BTD, cos_BTh, sin_BTh, attend)
    q, k, v = handed['args']
    return (k, v) if k is not None else (q,), (k_BTKh, v_BTKh)

  jaxpr = jax.make_jaxpr(layer_kv)(jnp.ones((1, 4, config.hidden_size), jnp.bfloat16)).jaxpr
  from_barrier = {id(v) for eqn in jaxpr.eqns if eqn.primitive.name == 'optimization_barrier'
                  for v in eqn.outvars}
  producer = {id(v): eqn for eqn in jaxpr.eqns for v in eqn.outvars}

  def source(var):  # through the slices and reshapes that take k and v out of a packed array
    eqn = producer.get(id(var))
    while eqn is not None and eqn.primitive.name in ('slice', 'split', 'reshape', 'squeeze'):
      var = eqn.invars[0]
      eqn = producer.get(id(var))
    return var

  handed_vars, returned_vars = jaxpr.outvars[:-2], jaxpr.outvars[-2:]
  assert all(id(v) in from_barrier for v in handed_vars)
  assert all(id(source(v)) in from_barrier for v in returned_vars)
  if packed:
    assert {id(source(v)) for v in returned_vars} == {id(handed_vars[0])}
  else:
    assert [id(v) for v in returned_vars] == [id(v) for v in handed_vars]


# Every method, on both layer paths, token for token against plain decoding, in bfloat16.
METHODS = {
    'pld': ('pld', dict(num_draft_tokens=5)),
    'static': ('static', dict(skip_set=(1, 4), num_draft_tokens=6, draft_exit_threshold=0.1)),
    'clasp_M3_K20': ('clasp', dict(skip_layers=3, num_draft_tokens=20,
                                   draft_exit_threshold=0.0, loi=3)),
    # one spare row in a verify pass: the DP's table takes three passes to fill
    'clasp_M3_K14': ('clasp', dict(skip_layers=3, num_draft_tokens=14,
                                   draft_exit_threshold=0.0, loi=1)),
    # `auto` on a grid of two M (each M one more drafting program on the fast path)
    'clasp_auto': ('clasp_auto', dict(candidates=(2, 4), initial_skip_layers=2,
                                      num_draft_tokens=4, draft_exit_threshold=0.0)),
    'conflayers': ('conflayers', dict(num_draft_tokens=4,
                                      conflayers_settings=tiny.QUICK_CONFLAYERS)),
}


@pytest.fixture(scope='module')
def bf16_model(tiny_model):
  config, params = tiny_model
  return config, jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)


#: (fast_path, logits_by_row, pass_width, unrolled) of the decoders compared: a CPU's defaults
#: (per-layer buffers in a layer loop, drafts passing over the skipped layers by `lax.cond`,
#: logits a row at a time), the same on the stacked layers (the reference), a CPU's at width 1,
#: and an accelerator's (per-layer buffers unrolled, drafts over the active layers' buffers, a
#: pass's logits at once).
PATHS = [(True, True, None, False), (False, True, None, False), (True, True, 1, False),
         (True, False, None, True)]


def _programs_of(path):
  """While active, decoders compile the path's layer program: the accelerators' unrolled
  layers (the CPU's layer loop turned off), or this machine's own."""
  if not path[3]:
    return contextlib.nullcontext()
  return mock.patch.object(model_lib, 'loops_over_layers', lambda: False)


def _decoder(params, config, strategy, path) -> Decoder:
  return Decoder(params, config, strategy, fast_path=path[0], logits_by_row=path[1],
                 pass_width=path[2])


@pytest.fixture(scope='module')
def bf16_vanilla(bf16_model):
  """Plain decoding's tokens on each path: each path is checked against its own (two
  compiled programs of different shape need not round alike; two passes of one must)."""
  config, params = bf16_model
  tokens = {}
  for path in PATHS:
    with _programs_of(path):
      decoder = _decoder(params, config, strategies.Vanilla(), path)
      tokens[path] = [decoder.generate(p, tiny.MAX_NEW).token_ids for p in tiny.prompts(config)]
  return tokens


#: Every method on every path, except the two long-draft CLaSp cases at width 1: their point
#: is a verify pass of several passes and the DP's table in a pass's spare rows, and at width 1
#: every verify pass is K + 1 passes with no spare row (each would add ~25 s of compiling).
CASES = [pytest.param(name, path, id=f'{name}-{path_id}')
         for path, path_id in zip(PATHS, ['cpu_defaults', 'cpu_stacked', 'cpu_width_1',
                                          'accelerator_defaults'])
         for name in METHODS if not (path[2] == 1 and name.startswith('clasp_M3_K'))]


@pytest.mark.parametrize('name,path', CASES)
def test_every_method_equals_plain_decoding_in_bfloat16(bf16_model, bf16_vanilla, name, path):
  config, params = bf16_model
  method, settings = METHODS[name]
  strategy = (strategies.AdaptiveClasp(**settings) if method == 'clasp_auto'
              else strategies.build(method, config, **settings))
  with _programs_of(path):
    decoder = _decoder(params, config, strategy, path)
    if method == 'clasp_auto':
      tiny.set_costs(decoder)
    outs = [decoder.generate(p, tiny.MAX_NEW) for p in tiny.prompts(config)]
  unrolled = path[3] or jax.default_backend() != 'cpu'
  assert decoder.drafts_active_layers == (path[0] and unrolled)
  assert [o.token_ids for o in outs] == bf16_vanilla[path]
  assert any(d > 0 for o in outs for d in o.draft_lengths)  # it did draft
