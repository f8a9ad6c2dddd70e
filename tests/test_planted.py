"""Planted models (clasp_jax/bench/planted.py) and the sweep's pieces, on a tiny shape.

The planted model's four inner layers are scaled by epsilon = 0.05; the same family at
epsilon = 1 has nothing planted. Whether drafting pays depends on the device: the tests that
judge `auto`'s choices give it the step costs measured for the LLaMA-3-8B shape on an H200
(docs/results/h200/decode.md) and score every method with them, so that they test the
policy's decisions, not this CPU's speed. CLaSp runs here are the paper's (no prompt lookup):
the prompts are random, and the point is the layer-skip policy.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clasp_jax import model as model_lib
from clasp_jax import sharding
from clasp_jax import strategies
from clasp_jax import widths
from clasp_jax.bench import planted
from clasp_jax.bench import planted_sweep
from clasp_jax.engine import Decoder
from clasp_jax.strategies import adaptive
import tiny

EPSILON = 0.05
MAX_NEW = 48


def _config():
  return tiny.tiny_config(num_layers=8, hidden_size=128, head_dim=32, intermediate_size=256,
                          vocab_size=512, eos_token_ids=())


L = _config().num_layers
# In full-step units, from the H200 8B figures (through Decoder.generate, 1024 context): a
# draft step at M = L/2 costs 0.52 of a plain step (taken as 0.1 + 0.84 (L - M) / L), a verify
# pass of up to 16 tokens is a plain step's pass, and the DP with the skip-set switch 2.4.
ACCELERATOR_COSTS = adaptive.Costs(full_step=1.0, draft_base=0.1, draft_per_layer=0.84 / L,
                                   verify=1.0, dp=2.4)
#: The accelerators' K, whose costs these tests model (a CPU's default K is 2).
K = strategies.default_num_draft_tokens(widths.DEFAULT_PASS_WIDTH)


def _modelled_rate(generations, costs=ACCELERATOR_COSTS) -> float:
  """Tokens per full-step time, each round (and refresh) costed with `costs`."""
  tokens = sum(len(g.token_ids) for g in generations)
  seconds = 0.0
  for g in generations:
    for drafted, skip_L, source in zip(g.draft_lengths, g.skip_sets, g.draft_sources):
      seconds += costs.verify
      if source == 'skip':
        seconds += drafted * costs.draft_step(L - int(skip_L.sum()))
    seconds += len(g.refresh_times) * costs.dp
  return tokens / seconds


@pytest.fixture(scope='module')
def spec():
  return planted.planted_model(_config(), epsilon=EPSILON)


@pytest.fixture(scope='module')
def params(spec):
  return planted.build_params(spec)


@pytest.fixture(scope='module')
def unplanted(spec):
  """The same family with nothing planted (epsilon = 1), and its params."""
  unplanted = dataclasses.replace(spec, epsilon=1.0)
  return unplanted, planted.build_params(unplanted)


@pytest.fixture(scope='module')
def prompts():
  return tiny.prompts(_config(), count=2, length=24)


def _generate(spec, params, prompts, strategy, costs=None):
  decoder = Decoder(params, spec.config, strategy)
  if costs is not None:  # what auto would have measured on the accelerator
    tiny.set_costs(decoder, costs)
  return [decoder.generate(p, MAX_NEW) for p in prompts]


@pytest.fixture(scope='module')
def vanilla(spec, params, prompts):
  return _generate(spec, params, prompts, strategies.Vanilla())


@pytest.fixture(scope='module')
def clasp_planted_m(spec, params, prompts):
  """CLaSp with M = the number of planted layers."""
  return _generate(spec, params, prompts, strategies.build(
      'clasp', spec.config, skip_layers=len(spec.planted), lookup=False, num_draft_tokens=K))


@pytest.fixture(scope='module')
def auto(spec, params, prompts):
  strategy = strategies.build('clasp', spec.config, skip_layers='auto', lookup=False,
                              num_draft_tokens=K)
  return _generate(spec, params, prompts, strategy, ACCELERATOR_COSTS)


def _drafting_fraction(generations) -> float:
  return float(np.mean([d > 0 for g in generations for d in g.draft_lengths]))


def test_planted_set_is_inner_seeded_and_sized():
  chosen = planted.choose_planted(80, 0.5, seed=3)
  assert len(chosen) == 40 and 0 not in chosen and 79 not in chosen
  assert chosen == planted.choose_planted(80, 0.5, seed=3) != planted.choose_planted(80, 0.5, 4)
  with pytest.raises(ValueError, match='inner'):
    planted.choose_planted(8, 0.9)


def test_only_planted_layers_are_scaled(spec, params, unplanted):
  _, unscaled = unplanted
  for name in ('wo', 'w_down'):
    for i in range(L):
      factor = EPSILON if i in spec.planted else 1.0
      np.testing.assert_allclose(params['layers'][name][i],
                                 factor * unscaled['layers'][name][i], rtol=1e-6)
  np.testing.assert_array_equal(params['layers']['wq'], unscaled['layers']['wq'])


def test_layouts_hold_the_same_values(spec, params):
  per_layer = planted.build_params(spec, per_layer=True)
  assert model_lib.is_per_layer(per_layer) and 'w_qkv' in per_layer['layers'][0]
  same = jax.tree.map(jnp.array_equal, model_lib.unstack_layers(params), per_layer)
  assert all(jax.tree.leaves(same))


def test_bfloat16_params_are_bfloat16_throughout(spec):
  params = planted.build_params(spec, jnp.bfloat16, per_layer=True)
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_bfloat16_draws_are_unbiased():
  """JAX's own bfloat16 normals have a mean of -0.012 std; summed over a wide product, a bias
  shared by every weight pushes every prompt towards the same token."""
  draws = jax.jit(planted._normal, static_argnums=(1, 2, 3))(
      jax.random.key(0, impl='rbg'), (1024, 4096), 1.0, jnp.dtype(jnp.bfloat16))
  assert draws.dtype == jnp.bfloat16
  assert abs(float(jnp.mean(draws.astype(jnp.float32)))) < 0.002  # 4 standard errors


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason="the CPU's buffer assignment")
def test_70b_generators_need_no_temporaries():
  """Compiled for the 70B shape (nothing allocated): on the CPU a layer, and the embedding
  with the LM head, are written in place. (On an H200, XLA keeps 1.4 GB and 4.2 GB of
  temporaries for a layer and the head, which fit.)"""
  spec = planted.planted_model('llama3-70b', epsilon=0.1)
  key = jax.eval_shape(lambda: jax.random.key(0, impl='rbg'))
  bf16 = jnp.dtype(jnp.bfloat16)
  weights = dataclasses.replace(spec, planted=(), epsilon=1.0)
  layer = planted._one_layer.lower(key, jax.ShapeDtypeStruct((), jnp.float32), weights, bf16)
  top = planted._one_top.lower(key, key, weights, bf16)
  for lowered in (layer, top):  # a few scalars and keys at most, against 1.7-4.2 GB weights
    assert lowered.compile().memory_analysis().temp_size_in_bytes < 2 ** 20


def test_a_mesh_needs_the_per_layer_layout(spec):
  with pytest.raises(ValueError, match='per-layer'):
    planted_sweep.SweepSettings(mesh='tp:1')
  with pytest.raises(ValueError, match='per-layer'):
    planted.build_params(spec, mesh=sharding.make_mesh('tp:1'))


def test_diversity_flags_loops_and_repeats():
  assert planted.diversity([7] * 96).degenerate
  loop = planted.diversity(list(range(12)) * 8)
  assert loop.degenerate and loop.lag == 12 and loop.lag_match == 1.0
  assert loop.longest_repeat == 84
  text = planted.diversity(np.random.RandomState(0).randint(0, 1000, 96))
  assert not text.degenerate and text.distinct_ratio > 0.9 and not text.reasons


def test_planted_text_is_diverse(vanilla):
  for g in vanilla:
    assert not planted.diversity(g.token_ids).degenerate, planted.diversity(g.token_ids)


def test_screening_keeps_diverse_prompts_and_drops_loops(spec, params, prompts):
  """A tied head copies the input token forever: screening drops every prompt of it."""
  untied = Decoder(params, spec.config, strategies.Vanilla())
  kept, tried = planted_sweep.screen_prompts(untied, prompts, 1, MAX_NEW)
  assert kept == [0] and len(tried) == 1 and not planted.diversity(tried[0]).degenerate
  tied_config = dataclasses.replace(spec.config, tie_embeddings=True)
  tied = Decoder({k: w for k, w in params.items() if k != 'lm_head'}, tied_config,
                 strategies.Vanilla())
  kept, tried = planted_sweep.screen_prompts(tied, prompts, 1, MAX_NEW)
  assert kept == [] and len(tried) == len(prompts)
  assert all(planted.diversity(tokens).degenerate for tokens in tried)


def test_a_point_says_whether_plain_decoding_repeated_itself(spec, prompts):
  """Screening decodes the timed prompt plainly before the timed run: on the CPU plain
  decoding repeats itself token for token, and the point and its table say so."""
  methods = planted_sweep.method_specs(spec, ['pld'])
  settings = planted_sweep.SweepSettings(max_new_tokens=16, warmup=1)
  point = planted_sweep.run_point(spec, methods, prompts, 1, prompts[0], settings,
                                  log=lambda _: None)
  assert point['plain_repeated'] == 1 == len(point['prompts'])
  assert point['methods']['pld']['identical'] == 1
  sweep = dict(points=[point])
  assert planted_sweep.markdown(sweep).splitlines()[-1].endswith('| 1/1 |')


def _tau(generations) -> float:
  return float(np.mean([a for g in generations for a in g.accept_lengths]))


def test_dp_finds_the_planted_layers_and_clasp_is_lossless(spec, vanilla, clasp_planted_m):
  recall = [spec.skip_precision_recall(s)[1] for g in clasp_planted_m for s in g.skip_sets]
  assert np.mean(recall) >= 0.9
  assert [g.token_ids for g in clasp_planted_m] == [g.token_ids for g in vanilla]


def test_a_methods_row_counts_rounds_by_source_and_m(spec, clasp_planted_m):
  """The row says where each round's drafts came from, and at which M the layer-skip rounds
  drafted."""
  row = planted_sweep.summarise_method(spec, clasp_planted_m, mismatches=None)
  by_source = row['rounds_by_source']
  assert sum(by_source.values()) == sum(len(g.accept_lengths) for g in clasp_planted_m)
  assert by_source['skip'] > 0
  assert row['skip_rounds_by_m'] == {len(spec.planted): by_source['skip']}
  # Every layer-skip round once, by (drafts, tokens committed); CLaSp at a fixed M without
  # lookup drafts with layers skipped in every round, so they hold all its tokens.
  assert by_source['skip'] == sum(by_source.values())
  outcomes = {tuple(map(int, k.split(':'))): n for k, n in row['skip_round_outcomes'].items()}
  assert sum(outcomes.values()) == by_source['skip']
  assert all(1 <= committed <= drafts + 1 for drafts, committed in outcomes)
  assert sum(c * n for (_, c), n in outcomes.items()) == sum(
      a for g in clasp_planted_m for a in g.accept_lengths)


def test_drafts_must_be_earned(spec, params, prompts, clasp_planted_m):
  """Skipping the planted layers drafts well; skipping as many other layers does not."""
  others = tuple(i for i in range(L) if i not in spec.planted)[:len(spec.planted)]
  static = _generate(spec, params, prompts, strategies.build('static', spec.config,
                                                             skip_set=others, num_draft_tokens=K))
  assert _tau(clasp_planted_m) > 4.0 and _tau(static) < 1.5


def test_auto_is_lossless(vanilla, auto):
  assert [g.token_ids for g in auto] == [g.token_ids for g in vanilla]


def test_drafting_pays_on_the_planted_model(vanilla, clasp_planted_m):
  assert _modelled_rate(clasp_planted_m) > 1.05 * _modelled_rate(vanilla)


@pytest.mark.xfail(strict=True, reason=(
    'adaptive.py: auto opens with a probe of 2 rounds of at most 2 drafts at M = 2, then tries '
    'M = 5 (an unplanted layer skipped: its drafts are rejected) and decodes plainly through '
    'its 32-round back-off before settling on M = 3-4; over these 48-token generations it '
    'drafts in a third of the rounds, at 0.72x of M = 4 under these costs'))
def test_auto_drafts_where_drafting_pays(auto, clasp_planted_m):
  assert _drafting_fraction(auto) >= 0.5
  assert _modelled_rate(auto) >= 0.9 * _modelled_rate(clasp_planted_m)


@pytest.fixture(scope='module')
def auto_unplanted(unplanted, prompts):
  spec, params = unplanted
  strategy = strategies.build('clasp', spec.config, skip_layers='auto', lookup=False,
                              num_draft_tokens=K)
  return _generate(spec, params, prompts, strategy, ACCELERATOR_COSTS)


def test_auto_stays_plain_on_an_unplanted_model(auto_unplanted):
  assert _drafting_fraction(auto_unplanted) <= 0.1  # its warm-up and probe rounds only


@pytest.mark.xfail(strict=True, reason=(
    'adaptive.py: its one probe (2 rounds of 2 drafts at M = 2) and the DP before it cost '
    'about 7% of a 48-token generation under these costs (a refresh is 2.4 verify passes); '
    'over longer generations the back-off, carried across prompts, spreads it thinner: 0.92x '
    'here against the 0.98x asked for'))
def test_auto_costs_at_most_2_percent_where_nothing_pays(vanilla, auto_unplanted):
  plain = _modelled_rate(vanilla)  # lengths only: the same on any model
  assert _modelled_rate(auto_unplanted) >= 0.98 * plain


def test_sweep_methods_and_prompts(spec):
  labels = ['pld', 'static', 'clasp-planted', 'clasp-0.4L', 'clasp-0.5L']
  specs = {m.label: m for m in planted_sweep.method_specs(spec, labels)}
  assert list(specs) == ['vanilla', 'clasp-0.4L', 'clasp-0.5L', 'clasp-planted', 'static', 'pld']
  assert specs['clasp-0.4L'].skip_layers == 3 and specs['clasp-0.5L'].skip_layers == 4
  wide = planted.planted_model(spec.config, epsilon=spec.epsilon, fraction=0.75)
  assert planted_sweep.method_specs(wide, ['clasp-planted'])[1].skip_layers == len(wide.planted)
  assert specs['static'].skip_set == spec.planted
  even = planted_sweep.method_specs(spec, ['static'], static_set='even')[1]
  assert even.skip_set == strategies.evenly_spaced_skip_set(spec.config, 4)
  with pytest.raises(ValueError, match='unknown'):
    planted_sweep.method_specs(spec, ['medusa'])
  prompts = planted_sweep.make_prompts(512, count=3, length=64)
  assert [len(p) for p in prompts] == [64] * 3
  assert all(max(p) < 512 for p in prompts)
  assert any(planted.diversity(p).longest_repeat >= 4 for p in prompts)  # lookup has matches


def test_a_changed_token_is_a_mismatch(vanilla):
  reference = [g.token_ids for g in vanilla]
  assert planted_sweep.find_mismatches(reference, vanilla) == []
  changed = list(reference[1])
  changed[5] = (changed[5] + 1) % 512
  generations = [vanilla[0], dataclasses.replace(vanilla[1], token_ids=changed)]
  [found] = planted_sweep.find_mismatches(reference, generations)
  assert found == dict(prompt=1, position=5, reference_token=reference[1][5], token=changed[5])
