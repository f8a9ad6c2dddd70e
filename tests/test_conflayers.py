"""ConfLayers: the selection rule on hand-made confidences, the search, and losslessness."""

import collections

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clasp_jax import engine
from clasp_jax import model as model_lib
from clasp_jax import strategies
from clasp_jax.cache import init_cache
from clasp_jax.engine import Decoder
from clasp_jax.strategies import conflayers
from clasp_jax.strategies.base import SKIP
import tiny

# A short evaluation, so that the search replaces sets within one short generation.
QUICK = dict(eval_rounds=4, early_rounds=2)
BAND = dict(ratio=0.4, band=0.25, step=0.05, max_steps=40)


def _layers(skip_L) -> list[int]:
  return np.nonzero(skip_L)[0].tolist()


# The worked examples below have L = 8: the rule looks at the six inner layers 1..6 (inner
# index k = layer - 1); the first and last entries are never candidates. z-scoring is a
# positive affine map, so every comparison and the normalised g2 can be worked out on c itself.
# np.gradient uses one-sided differences at the ends, central ones inside.


def test_worked_example():
  c = [9.0, 2, 1, 2, 2, 0, 2, -9.0]
  # inner c = [2, 1, 2, 2, 0, 2]
  # g  = gradient(c)  = [1-2, (2-2)/2, (2-1)/2, (0-2)/2, (2-2)/2, 2-0] = [-1, 0, .5, -1, 0, 2]
  # g2 = gradient(g)  = [0+1, (.5+1)/2, (-1-0)/2, (0-.5)/2, (2+1)/2, 2-0]
  #                   = [1, .75, -.5, -.25, 1.5, 2]; count = 1 (g2[1] != g2[0])
  # mean g2 = 4.5 / 6 = .75; max 2 and min -.5 both lie 1.25 from it: slope .5 / 1.25 = .4
  # normalised = .5 + .4 (g2 - .75) = [.6, .5, 0, .1, .8, 1]
  # w_k = 2 + int(5 * 1 * n_k * (k + 1) / 8):
  #   int(.375), int(.625), int(0), int(.25), int(2.5), int(3.75) = 0, 0, 0, 0, 2, 3
  #   w = [2, 2, 2, 2, 4, 5], half windows [1, 1, 1, 1, 2, 2]
  z_N = conflayers.zscore(np.asarray(c[1:-1]))
  np.testing.assert_array_equal(conflayers.windows(z_N, 8), [2, 2, 2, 2, 4, 5])
  np.testing.assert_allclose(conflayers.normalise_to_mean_half(np.gradient(np.gradient(z_N))),
                             [.6, .5, 0, .1, .8, 1], atol=1e-12)
  # lambda = 0, skip when c_k < mean of its neighbours:
  #   layer 1: [1] -> 2 < 1 no          layer 2: [2, 2] -> 1 < 2 SKIP
  #   layer 3: [1, 2] -> 2 < 1.5 no     layer 4: [2, 0] -> 2 < 1 no
  #   layer 5: [2, 2 | 2] -> 0 < 2 SKIP layer 6: [2, 0] -> 2 < 1 no
  assert _layers(conflayers.select_skip_layers(np.asarray(c), 0.0)) == [2, 5]
  # lambda = .5, threshold mean - .5 std: layers 2 and 5 have flat windows (std 0) and stay;
  #   layer 3: 1.5 - .5 * .5 = 1.25, layer 4 and 6: 1 - .5 * 1 = .5: still not skipped.
  assert _layers(conflayers.select_skip_layers(np.asarray(c), 0.5)) == [2, 5]
  # lambda = -1.2: layer 1's window is flat (threshold 1 < 2), layer 3: 1.5 + 1.2 * .5 = 2.1 > 2,
  #   layers 4 and 6: 1 + 1.2 * 1 = 2.2 > 2: all but layer 1 skipped.
  assert _layers(conflayers.select_skip_layers(np.asarray(c), -1.2)) == [2, 3, 4, 5, 6]


def test_leading_run_widens_windows():
  c = [0.0, 1, 1, 1, 1, 0, 3, 0.0]
  # inner c = [1, 1, 1, 1, 0, 3]
  # g  = [0, 0, 0, (0-1)/2, (3-1)/2, 3-0] = [0, 0, 0, -.5, 1, 3]
  # g2 = [0, 0, (-.5-0)/2, (1-0)/2, (3+.5)/2, 3-1] = [0, 0, -.25, .5, 1.75, 2]
  # count = 2: the first two g2 values are equal (exactly: equal confidences give equal z).
  # mean g2 = 4 / 6 = 2/3; max 2 lies 4/3 away, min -.25 11/12: slope min(.375, .545) = .375
  # normalised = .5 + .375 (g2 - 2/3) = [.25, .25, .15625, .4375, .90625, 1]
  # w_k = 2 + int(5 * 2 * n_k * (k + 1) / 8):
  #   int(.3125), int(.625), int(.586), int(2.1875), int(5.66), int(7.5) = 0, 0, 0, 2, 5, 7
  #   w = [2, 2, 2, 4, 7, 9], half windows [1, 1, 1, 2, 3, 4]
  z_N = conflayers.zscore(np.asarray(c[1:-1]))
  assert conflayers.leading_run(np.gradient(np.gradient(z_N))) == 2
  np.testing.assert_array_equal(conflayers.windows(z_N, 8), [2, 2, 2, 4, 7, 9])
  # lambda = 0:
  #   layers 1-3: neighbours all 1, c = 1: no
  #   layer 4: [1, 1 | 0, 3] mean 1.25 -> 1 < 1.25 SKIP (with count 1 its window would be
  #            2 + int(1.09) = 3, neighbours [1, 0], mean .5: not skipped)
  #   layer 5: [1, 1, 1 | 3] mean 1.5 -> 0 < 1.5 SKIP
  #   layer 6: [1, 1, 1, 0] mean .75 -> 3 < .75 no
  assert _layers(conflayers.select_skip_layers(np.asarray(c), 0.0)) == [4, 5]


def test_lambda_rises_when_too_many_layers_are_skipped():
  c = np.asarray([0.0, 0, 1, 0, 1, 3, 1, 0.0])
  # inner c = [0, 1, 0, 1, 3, 1]
  # g  = [1, 0, 0, 1.5, 0, -2]; g2 = [-1, -.5, .75, 0, -1.75, -2]; count 1
  # mean g2 = -.75; max .75 lies 1.5 away, min -2 1.25 away: slope min(1/3, .4) = 1/3
  # normalised = [.417, .583, 1, .75, .167, .083]
  # w_k = 2 + int(5 * n_k * (k + 1) / 8) = 2 + int([.26, .73, 1.875, 1.875, .52, .31])
  #     = [2, 2, 3, 3, 2, 2]: every half window is 1.
  # lambda = 0: layer 1: [1] -> 0 < 1 SKIP; layer 2: [0, 0] no; layer 3: [1, 1] SKIP;
  #   layer 4: [0, 3] mean 1.5 -> 1 < 1.5 SKIP; layer 5: [1, 1] no; layer 6: [3] SKIP.
  #   4 of 6 = .667 > .4 + .25: too many.
  assert _layers(conflayers.select_skip_layers(c, 0.0)) == [1, 3, 4, 6]
  # Only layer 4's window has spread (std 1.5): it is skipped while 1 < 1.5 - 1.5 lambda, i.e.
  # lambda < 1/3. Lambda rises by .05 until .35 > 1/3: 3 of 6 = .5, inside [.4, .65].
  skip_L, lam = conflayers.select_in_band(c, 0.0, **BAND)
  assert _layers(skip_L) == [1, 3, 6]
  assert lam == pytest.approx(0.35)
  # With too few steps allowed it returns the nearest set it saw (all had 4 layers: the first).
  skip_L, lam = conflayers.select_in_band(c, 0.0, **dict(BAND, max_steps=3))
  assert _layers(skip_L) == [1, 3, 4, 6] and lam == 0.0


def test_lambda_falls_when_too_few_layers_are_skipped():
  c = np.asarray([0.0, 2, 0, 2, 0, 2, 3, 0.0])
  # inner c = [2, 0, 2, 0, 2, 3]
  # g  = [-2, 0, 0, 0, 1.5, 1]; g2 = [2, 1, 0, .75, .5, -.5]; count 1
  # mean g2 = .625; max 2 lies 1.375 away, min -.5 1.125 away: slope .5 / 1.375 = 4/11
  # normalised = [1, .636, .273, .545, .455, .091]
  # w_k = 2 + int([.625, .795, .511, 1.364, 1.42, .34]) = [2, 2, 2, 3, 3, 2]: half windows 1.
  # lambda = 0: layer 1: [0] no; layer 2: [2, 2] -> 0 SKIP; layer 3: [0, 0] no;
  #   layer 4: [2, 2] SKIP; layer 5: [0, 3] mean 1.5 -> 2 < 1.5 no; layer 6: [2] no.
  #   2 of 6 = .333 < .4: too few.
  assert _layers(conflayers.select_skip_layers(c, 0.0)) == [2, 4]
  # Layer 5 (window std 1.5) is skipped once 2 < 1.5 - 1.5 lambda, i.e. lambda < -1/3:
  # lambda falls by .05 to -.35, giving 3 of 6.
  skip_L, lam = conflayers.select_in_band(c, 0.0, **BAND)
  assert _layers(skip_L) == [2, 4, 5]
  assert lam == pytest.approx(-0.35)


@pytest.mark.parametrize('seed', range(20))
def test_first_and_last_layers_are_never_skipped(seed):
  rng = np.random.RandomState(seed)
  c = rng.uniform(0.0, 1.0, 4 + seed)  # L >= 4: at least two inner layers
  c[0] = c[-1] = -100.0  # far below every neighbourhood
  for lam in (-3.0, 0.0, 3.0):
    skip_L = conflayers.select_skip_layers(c, lam)
    assert not skip_L[0] and not skip_L[-1]
  skip_L, _ = conflayers.select_in_band(c, 0.0, **BAND)
  assert not skip_L[0] and not skip_L[-1]


def test_normalise_to_mean_half():
  # mean 1; the farther extreme (4, 3 away) goes to 1, slope 1/6: 0 -> .5 - 1/6.
  np.testing.assert_allclose(conflayers.normalise_to_mean_half(np.asarray([0.0, 0, 0, 4])),
                             [1 / 3, 1 / 3, 1 / 3, 1.0])
  np.testing.assert_array_equal(conflayers.normalise_to_mean_half(np.full(5, 2.0)), [.5] * 5)


def test_sublayer_confidence():
  valid_BT = jnp.asarray([[True, True, False]])
  flat_BTD = jnp.zeros((1, 3, 64))
  assert float(conflayers.sublayer_confidence(flat_BTD, valid_BT)) == pytest.approx(0.0, abs=1e-6)
  # One token fully concentrated, one flat: mean entropy log(D) / 2. The padded token (any
  # values) is left out.
  peaked_BTD = flat_BTD.at[0, 0, 5].set(1e4).at[0, 2, :].set(jnp.arange(64.0))
  assert float(conflayers.sublayer_confidence(peaked_BTD, valid_BT)) == pytest.approx(0.5)


def test_sublayer_outputs_rebuild_the_hidden_states(tiny_model):
  """attention + MLP outputs summed over layers give `forward`'s residual stream; the chunk
  sees the cached prefix."""
  config, params = tiny_model
  tokens_BT = jnp.asarray(np.random.RandomState(0).randint(4, config.vocab_size, (1, 24)))
  out = jax.jit(lambda p, t, c: model_lib.forward(p, config, t, c))(
      params, tokens_BT, init_cache(config, 64))
  start = 16
  deltas_LTD = jax.jit(lambda p, t, c: model_lib.sublayer_stats(
      p, config, t, c, jnp.int32(start), lambda a, m: (a + m)[0]))(
          params, tokens_BT[:, start:], out.cache)
  hiddens_LTD = out.hiddens_LBPD[:, 0, start:]
  np.testing.assert_allclose(hiddens_LTD[0] + jnp.cumsum(deltas_LTD, axis=0), hiddens_LTD[1:],
                             atol=1e-4)


# The `DecodeState` fields the confidence forward reads (a namedtuple is a pytree).
_State = collections.namedtuple('_State', 'tokens_N num_tokens prompt_len cache')


def test_confidence_window_pads_and_masks(tiny_model):
  """Fewer generated tokens than W: the padded forward gives the unpadded confidences."""
  config, params = tiny_model
  tokens = np.random.RandomState(2).randint(4, config.vocab_size, 30)
  cache = jax.jit(lambda p, t, c: model_lib.forward(p, config, t, c).cache)(
      params, jnp.asarray(tokens[None, :29]), init_cache(config, 64))
  state = _State(tokens_N=jnp.asarray(np.pad(tokens, (0, 34))), num_tokens=jnp.int32(30),
                 prompt_len=jnp.int32(20), cache=cache)
  confidence = jax.jit(conflayers.layer_confidence, static_argnames=('config', 'window'))
  exact_L = confidence(params, config, state, window=10)  # the 10 generated tokens
  np.testing.assert_allclose(confidence(params, config, state, window=32), exact_L, rtol=1e-5)
  assert not np.allclose(confidence(params, config, state, window=4), exact_L)


def _judge(accepted, drafted=4, **settings):
  strategy = strategies.ConfLayers(**dict(QUICK, **settings))
  return conflayers.judge([a - 1 for a in accepted], [(a - 1) / drafted for a in accepted],
                          strategy)


def test_judge_counts_accepted_drafts_without_the_bonus_token():
  # Rounds committing 2 tokens: 1 accepted draft each, not < 1: no early replacement.
  assert _judge([2, 2]) == conflayers.KEEP_EVALUATING
  assert _judge([1, 2]) == conflayers.REPLACE_EARLY  # mean .5 accepted drafts after 2 rounds
  assert _judge([2, 2, 2, 2]) == conflayers.EVALUATED
  # 5 committed = 4 accepted drafts: not > 4, so no stop. 6 committed after 5 drafts = 5
  # accepted drafts at rate 1: stop. After 6 drafts the rate is 5/6 < .95: no stop.
  assert _judge([5, 5, 5, 5], drafted=4) == conflayers.EVALUATED
  assert _judge([6, 6, 6, 6], drafted=5) == conflayers.STOP
  assert _judge([6, 6, 6, 6], drafted=6) == conflayers.EVALUATED


@pytest.mark.parametrize('settings, match', [
    (dict(window=0), 'window'),
    (dict(skip_ratio=1.0), 'skip_ratio'),
    (dict(lambda_step=0.0), 'lambda_step'),
    (dict(eval_rounds=0), 'eval_rounds'),
])
def test_build_validates_settings(settings, match):
  config = tiny.tiny_config()
  assert 'conflayers' in strategies.METHODS
  assert isinstance(strategies.build('conflayers', config), strategies.ConfLayers)
  with pytest.raises(ValueError, match=f'conflayers {match}'):
    strategies.build('conflayers', config, conflayers_settings=settings)
  with pytest.raises(ValueError, match='L >= 4'):
    strategies.build('conflayers', tiny.tiny_config(num_layers=3))


def test_policy_keeps_the_best_set_and_stops(tiny_model):
  config, _ = tiny_model
  policy = conflayers.ConfLayersPolicy(strategies.ConfLayers(**QUICK), config)
  initial_L = conflayers.every_other_layer(config.num_layers)
  policy.observe([3] * 4, [4] * 4, [SKIP] * 4)
  assert policy.reselect and policy.best_accepted == 2.0
  np.testing.assert_array_equal(policy.best_L, initial_L)
  policy.reselect, policy.current_L = False, np.eye(config.num_layers, dtype=bool)[2]
  policy.observe([1, 1], [4, 4], [SKIP] * 2)  # replaced early: not a candidate for best
  assert policy.reselect and policy.best_accepted == 2.0
  policy.reselect = False
  policy.observe([7] * 4, [6] * 4, [SKIP] * 4)  # 6 accepted drafts a round, every draft accepted
  assert not policy.searching and not policy.reselect
  assert _layers(policy.current_L) == [2]


def test_policy_settles_on_the_best_after_max_iterations(tiny_model):
  config, _ = tiny_model
  policy = conflayers.ConfLayersPolicy(strategies.ConfLayers(**QUICK, max_iterations=1),
                                       config)
  policy.observe([2] * 4, [4] * 4, [SKIP] * 4)
  assert not policy.searching and not policy.reselect
  assert _layers(policy.current_L) == [1, 3]


@pytest.mark.parametrize('fast_path', [False, True])
def test_greedy_is_identical_to_vanilla_and_the_search_moves(tiny_model, tiny_vanilla_outputs,
                                                             monkeypatch, fast_path):
  config, params = tiny_model
  if not fast_path:  # the reference path takes any skip set without retracing
    for module, name in ((engine, '_round'), (conflayers, 'layer_confidence')):
      monkeypatch.setattr(module, name, chex.assert_max_traces(getattr(module, name), n=1))
  strategy = strategies.build('conflayers', config, num_draft_tokens=4, draft_exit_threshold=0.0,
                              conflayers_settings=tiny.QUICK_CONFLAYERS)
  decoder = Decoder(params, config, strategy, fast_path=fast_path)
  skip_sets = set()
  for prompt, tokens in zip(tiny.prompts(config, count=2), tiny_vanilla_outputs):
    out = decoder.generate(prompt, tiny.MAX_NEW)
    assert out.token_ids == tokens
    assert not out.skip_sets[:, 0].any() and not out.skip_sets[:, -1].any()
    skip_sets |= {tuple(s) for s in out.skip_sets.tolist()}
  assert len(skip_sets) > 2  # the search proposed new sets
  assert decoder.conflayers_policy.iterations > 2
  chex.clear_trace_counter()
