"""The CLaSp dynamic programme (Algorithm 1) on tiny random models."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clasp_jax import attention
from clasp_jax import attention_pallas
from clasp_jax import engine
from clasp_jax import model as model_lib
from clasp_jax import widths
from clasp_jax.cache import init_cache
from clasp_jax.engine import Decoder
from clasp_jax.strategies import clasp
from clasp_jax.strategies import clasp_dp
from clasp_jax.strategies import layer_skip
from clasp_jax.strategies.base import Segment
from clasp_jax.strategies.clasp import clasp_dp_table
import tiny

PROMPT_LEN = 24


def _prefill_target(config, params, seed=0):
  """Cache and hidden states [L+1, D] of the last prompt token, as the engine has them."""
  tokens_1T = jax.random.randint(jax.random.key(seed), (1, PROMPT_LEN), 4, config.vocab_size)
  out = model_lib.forward(params, config, tokens_1T, init_cache(config, 64),
                          out_idx_BP=jnp.array([[PROMPT_LEN - 1]]))
  return out.cache, out.hiddens_LBPD[:, 0, 0]


def _naive_dp(config, params, cache, hidden_LD, num_skip):
  """Algorithm 1 cell by cell, each candidate state run alone as a real token at `pos`.

  A single token written at row `pos` of a cache rolled back to `pos` attends to the prefix
  and to itself: exactly the pseudo-token semantics, through the ordinary decoder layer.
  """
  L, M = config.num_layers, num_skip
  pos = int(cache.length) - 1
  h = np.asarray(hidden_LD, np.float64)
  cos_tab = model_lib.rope_tables(config, jnp.full((1, 1), pos, jnp.int32))

  def run_layer(i, x_D):
    def attend(q_11Hh, k_11Kh, v_11Kh):  # the prefix from the cache, then the token itself
      return attention.cache_attention(q_11Hh, k_11Kh, v_11Kh, cache.k_LBSKh, cache.v_LBSKh,
                                       i, jnp.int32(pos))
    out_11D, _, _ = model_lib.decoder_layer(
        model_lib.layer_params(params, i), config, jnp.asarray(x_D, jnp.float32)[None, None],
        *cos_tab, attend)
    return np.asarray(out_11D[0, 0], np.float64)

  def cos(a, b):
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))

  g = {(0, 0): h[0]}
  choice = {}
  for i in range(1, L + 1):
    g[(i, 0)] = h[i]
    for j in range(1, min(i, M) + 1):
      if j == i:
        g[(i, j)], choice[(i, j)] = g[(i - 1, j - 1)], True
        continue
      run, skip = run_layer(i - 1, g[(i - 1, j)]), g[(i - 1, j - 1)]
      choice[(i, j)] = cos(skip, h[i]) >= cos(run, h[i])
      g[(i, j)] = skip if choice[(i, j)] else run
  skip_set, j = [], M
  for i in range(L, 0, -1):
    if j and choice[(i, j)]:
      skip_set.append(i - 1)
      j -= 1
  return sorted(skip_set)


@pytest.mark.parametrize('num_skip', [1, 2, 3, 5])
def test_skips_exactly_m_layers(num_skip):
  config = tiny.tiny_config()
  params = tiny.tiny_params(config)
  cache, hidden_LD = _prefill_target(config, params)
  skip_L = jax.jit(clasp_dp, static_argnums=(1, 4))(params, config, cache, hidden_LD, num_skip)
  chex.assert_shape(skip_L, (config.num_layers,))
  assert int(skip_L.sum()) == num_skip


def test_zero_skip_is_empty():
  config = tiny.tiny_config()
  params = tiny.tiny_params(config)
  cache, hidden_LD = _prefill_target(config, params)
  assert not clasp_dp(params, config, cache, hidden_LD, 0).any()


@pytest.mark.parametrize('identity_layers', [(2,), (1, 4), (0, 3, 5)])
def test_identity_layers_are_the_ones_skipped(identity_layers):
  config = tiny.tiny_config()
  params = tiny.tiny_params(config, seed=3)
  layers = dict(params['layers'])
  for name in ('wo', 'w_down'):  # zero output projections: the layer adds nothing
    layers[name] = layers[name].at[np.array(identity_layers)].set(0.0)
  params = dict(params, layers=layers)
  cache, hidden_LD = _prefill_target(config, params)
  skip_L = clasp_dp(params, config, cache, hidden_LD, len(identity_layers))
  assert np.flatnonzero(np.asarray(skip_L)).tolist() == list(identity_layers)


# The pseudo-tokens' attention: the `jnp` reference, and the fused GPU kernel (in Pallas's
# interpret mode off the GPU), which the engine gives the DP on GPUs.
PREFIX_ATTENTIONS = {
    'xla': attention.prefix_attention,
    'pallas': functools.partial(attention_pallas.prefix_attention_pallas,
                                interpret=jax.default_backend() != 'gpu'),
}


# The kernel (interpreted, slow on a CPU) on the smallest and the largest skip count.
@pytest.mark.parametrize('seed,num_skip,attend', [
    (0, 2, 'xla'), (1, 3, 'xla'), (2, 4, 'xla'), (5, 5, 'xla'), (0, 2, 'pallas'),
    (5, 5, 'pallas')])
def test_batched_dp_equals_per_state_loop(seed, num_skip, attend):
  config = tiny.tiny_config()
  params = tiny.tiny_params(config, seed=seed)
  cache, hidden_LD = _prefill_target(config, params, seed=seed)
  fast = np.flatnonzero(np.asarray(clasp_dp(params, config, cache, hidden_LD, num_skip,
                                            attention=PREFIX_ATTENTIONS[attend])))
  assert fast.tolist() == _naive_dp(config, params, cache, hidden_LD, num_skip)


def test_pseudo_tokens_leave_the_cache_untouched():
  config = tiny.tiny_config()
  params = tiny.tiny_params(config)
  cache, hidden_LD = _prefill_target(config, params)
  k_before, v_before = np.asarray(cache.k_LBSKh), np.asarray(cache.v_LBSKh)
  dp = jax.jit(clasp_dp, static_argnums=(1, 4))
  dp(params, config, cache, hidden_LD, 3).block_until_ready()
  np.testing.assert_array_equal(np.asarray(cache.k_LBSKh), k_before)
  np.testing.assert_array_equal(np.asarray(cache.v_LBSKh), v_before)
  assert int(cache.length) == PROMPT_LEN


def test_pseudo_token_ignores_other_candidates_and_target_row():
  """Each pseudo-token's output depends only on itself and the prefix [0, pos)."""
  config = tiny.tiny_config()
  params = tiny.tiny_params(config)
  cache, hidden_LD = _prefill_target(config, params)
  pos = cache.length - 1
  lp = model_lib.layer_params(params, 2)
  x_MD = jax.random.normal(jax.random.key(7), (4, config.hidden_size))
  poisoned = cache.replace(k_LBSKh=cache.k_LBSKh.at[2, 0, pos:].set(100.0))
  with jax.default_matmul_precision('highest'):  # a GPU's default TF32: up to 1e-2 apart
    together = model_lib.pseudo_token_layer(lp, config, x_MD, pos, cache, 2)
    alone = jnp.stack([model_lib.pseudo_token_layer(lp, config, x_MD[m:m + 1], pos, poisoned,
                                                    2)[0] for m in range(4)])
  np.testing.assert_allclose(np.asarray(together), np.asarray(alone), atol=1e-5)


def _band_rounds(config, params, *, num_skip, num_draft_tokens, pass_width, fast_path):
  """A decoder whose verify passes fill the DP's table, its state after the prefill with a
  skip set in force, and the standalone DP's table for that state's target."""
  strategy = clasp.Clasp(num_skip=num_skip, num_draft_tokens=num_draft_tokens,
                         draft_exit_threshold=0.0, lookup=False)
  decoder = Decoder(params, config, strategy, pass_width=pass_width, fast_path=fast_path)
  state = decoder.start(tiny.prompts(config, 1)[0], 64)
  table_LJ = np.asarray(clasp_dp_table(decoder.params, config, state.cache,
                                       state.target_hidden_LD, num_skip))
  state = decoder.put_skip_set(state, layer_skip.skip_vector(config, (1, 3)))
  return decoder, state, table_LJ


@pytest.mark.parametrize('fast_path', [False, True])
@pytest.mark.parametrize('num_skip,num_draft_tokens,pass_width', [
    (3, 4, 16),  # 11 spare rows: one band
    (5, 4, 8),   # 3 spare rows: two bands
    (5, 5, 8),   # 2 spare rows: three bands
])
def test_verify_passes_fill_the_standalone_dp_table(num_skip, num_draft_tokens, pass_width,
                                                     fast_path):
  config = tiny.tiny_config(eos_token_ids=())
  params = tiny.tiny_params(config, seed=2)
  decoder, state, table_LJ = _band_rounds(config, params, num_skip=num_skip,
                                          num_draft_tokens=num_draft_tokens,
                                          pass_width=pass_width, fast_path=fast_path)
  spare = widths.verify_rows(num_draft_tokens, pass_width) - num_draft_tokens - 1
  bands = -(-num_skip // spare)
  for band in range(bands):
    assert int(state.search.completed) == 0 and int(state.search.band) == band
    state, _ = decoder.run_segment(state, Segment(draft=True, rounds=1), 64)
  assert int(state.search.completed) == 1 and int(state.search.band) == 0
  np.testing.assert_array_equal(np.asarray(state.search.ready_LJ), table_LJ)


def test_refreshes_read_the_verify_passes_tables():
  """A generation runs the DP as a pass of its own once (its first refresh, before any
  verify pass); every later refresh reads a table the verify passes filled (or keeps the set
  in force until one is reported)."""
  config = tiny.tiny_config()
  params = tiny.tiny_params(config)
  own_passes = []
  for in_verify in (True, False):
    strategy = clasp.Clasp(num_skip=2, num_draft_tokens=4, draft_exit_threshold=0.0,
                           lookup=False, dp_in_verify=in_verify)
    decoder = Decoder(params, config, strategy)
    choose = decoder.choose_skip_set
    calls = []
    decoder.choose_skip_set = lambda *a, calls=calls, choose=choose: (calls.append(1),
                                                                      choose(*a))[1]
    out = decoder.generate(tiny.prompts(config, 1)[0], tiny.MAX_NEW)
    own_passes.append((len(calls), len(out.refresh_times)))
  (with_table, refreshes), (without, refreshes_without) = own_passes
  assert refreshes > 2 and with_table == 1
  assert without == refreshes_without
