"""The round loop on tiny random models: losslessness, statistics, no retracing, errors."""

import logging
import re

import chex
import jax
import numpy as np
import pytest

from clasp_jax import engine
from clasp_jax import model as model_lib
from clasp_jax import strategies
from clasp_jax import widths
from clasp_jax.engine import Decoder
from clasp_jax.sampling import SamplingConfig
from clasp_jax.strategies.base import PLAIN, SKIP
import tiny

pytestmark = pytest.mark.slow  # minutes in all on 2 cores: started first (conftest.py)


def _skip_set_changes(skip_sets_RL: np.ndarray) -> int:
  """How many rounds drafted with another skip set than the round before."""
  return int(np.any(np.diff(skip_sets_RL, axis=0), axis=1).sum())


#: The layer programs a decoder may run: the stacked reference, per-layer buffers as this
#: machine runs them (on a CPU a layer loop, drafting every M with one program), and per-layer
#: buffers unrolled as accelerators run them, drafting over the active layers alone (the CPU's
#: loop turned off).
LAYER_PROGRAMS = ['stacked', 'per_layer', 'unrolled']


def _decoder_of(layers, monkeypatch, params, config, strategy, **kwargs) -> Decoder:
  if layers == 'unrolled':
    monkeypatch.setattr(model_lib, 'loops_over_layers', lambda: False)
  return Decoder(params, config, strategy, fast_path=layers != 'stacked', **kwargs)


@pytest.mark.parametrize('method,settings', [
    ('clasp', dict(skip_layers=0, num_draft_tokens=4, draft_exit_threshold=0.0, loi=1)),
    ('clasp', dict(skip_layers=2, num_draft_tokens=4, draft_exit_threshold=0.0, loi=1)),
    ('clasp', dict(skip_layers=3, num_draft_tokens=8, draft_exit_threshold=0.3, loi=3)),
    ('clasp', dict(skip_layers=5, num_draft_tokens=1, draft_exit_threshold=0.7, loi=2)),
    ('static', dict(skip_set=(1, 4), num_draft_tokens=6, draft_exit_threshold=0.1)),
    ('pld', dict(num_draft_tokens=5)),
])
def test_greedy_is_identical_to_vanilla(tiny_model, tiny_vanilla_outputs, method, settings):
  config, params = tiny_model
  decoder = Decoder(params, config, strategies.build(method, config, **settings))
  for prompt, expected in zip(tiny.prompts(config), tiny_vanilla_outputs):
    out = decoder.generate(prompt, tiny.MAX_NEW)
    assert out.token_ids == expected
    assert sum(out.accept_lengths) + 1 >= len(out.token_ids)
    assert all(1 <= a <= decoder.strategy.num_draft_tokens + 1 for a in out.accept_lengths)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason="the CPU's pass width")
def test_every_method_shares_the_cpus_pass_width(tiny_model):
  """On the CPU every method's decoder runs passes of `CPU_PASS_WIDTH` rows unless told
  otherwise (one width, so that they compare exactly), K + 1 for the default K, and drafts
  that many: a verify is one pass. CLaSp's DP then has no spare row of a verify pass to ride
  in and runs as a pass of its own, where a 16-row pass would carry it."""
  config, params = tiny_model
  decoders = [Decoder(params, config, strategies.build(m, config))
              for m in ('vanilla', 'pld', 'static', 'clasp', 'conflayers')]
  assert {d.pass_width for d in decoders} == {widths.CPU_PASS_WIDTH}
  assert {d.strategy.num_draft_tokens + 1 for d in decoders[1:]} == {widths.CPU_PASS_WIDTH}
  assert {d.verify_rows for d in decoders[1:]} == {widths.CPU_PASS_WIDTH}
  clasp = strategies.build('clasp', config, skip_layers=2)
  # pylint: disable=protected-access
  assert not Decoder(params, config, clasp)._search_columns  # the DP: a pass of its own
  assert Decoder(params, config, clasp, pass_width=16)._search_columns == clasp.num_skip + 1


def test_full_model_draft_accepts_everything(tiny_model):
  """With M = 0 the draft is the verify model: every draft is accepted (tau = K + 1)."""
  config, params = tiny_model
  decoder = Decoder(params, config, strategies.build(
      'clasp', config, skip_layers=0, num_draft_tokens=4, draft_exit_threshold=0.0,
      lookup=False))
  out = decoder.generate(tiny.prompts(config)[0], 41)
  assert out.accept_lengths[:-1] == [5] * (len(out.accept_lengths) - 1)
  assert out.draft_lengths[0] == 4


def test_statistics_shapes(tiny_model):
  config, params = tiny_model
  decoder = Decoder(params, config, strategies.build(
      'clasp', config, skip_layers=2, num_draft_tokens=4, draft_exit_threshold=0.0, loi=2,
      lookup=False))
  out = decoder.generate(tiny.prompts(config)[0], tiny.MAX_NEW)
  rounds = len(out.accept_lengths)
  chex.assert_shape(out.skip_sets, (rounds, config.num_layers))
  assert (out.skip_sets.sum(axis=1) == 2).all()
  assert len(out.draft_lengths) == rounds
  # The host refreshes before the first segment and after each that ended on a new skip set.
  assert len(out.refresh_times) == 1 + _skip_set_changes(out.skip_sets)
  assert 1.0 <= out.mean_accepted <= 5.0


def test_stops_at_eos(tiny_model):
  config, params = tiny_model
  decoder = Decoder(params, config, strategies.Vanilla())
  free = decoder.generate(tiny.prompts(config)[0], tiny.MAX_NEW).token_ids
  eos = free[9]  # the EOS of the streaming test below: the same programs, compiled once
  stopping = Decoder(params, config.__class__(**{**config.__dict__, 'eos_token_ids': (eos,)}),
                     strategies.build('clasp', config, skip_layers=2, num_draft_tokens=4,
                                      draft_exit_threshold=0.0))
  out = stopping.generate(tiny.prompts(config)[0], tiny.MAX_NEW).token_ids
  assert out == free[:free.index(eos) + 1]


def test_a_generation_the_prefill_finishes_runs_no_round(tiny_model, tiny_vanilla_outputs,
                                                        monkeypatch):
  """One new token, or EOS as the first: the prefill's token is the answer, with no segment
  (nor skip-set choice) run or compiled after it."""
  config, params = tiny_model
  prompt, expected = tiny.prompts(config)[0], tiny_vanilla_outputs[0]
  eos_config = config.__class__(**{**config.__dict__, 'eos_token_ids': (expected[0],)})
  for model_config, max_new in ((config, 1), (eos_config, tiny.MAX_NEW)):
    decoder = Decoder(params, model_config, strategies.build('clasp', model_config))
    monkeypatch.setattr(decoder, 'run_segment', lambda *args: pytest.fail('ran a segment'))
    out = decoder.generate(prompt, max_new)
    assert out.token_ids == expected[:1] and out.accept_lengths == []
    assert out.mean_accepted == 1.0


@pytest.mark.parametrize('method,settings', [
    ('vanilla', {}), ('pld', dict(num_draft_tokens=5)),
    ('clasp', dict(skip_layers=2, num_draft_tokens=4, draft_exit_threshold=0.0, loi=2))])
def test_streamed_tokens_are_the_generation(tiny_model, tiny_vanilla_outputs, method, settings):
  """`on_tokens` is handed every new token once, in order, cut at EOS and the budget."""
  config, params = tiny_model
  prompt, expected = tiny.prompts(config)[0], tiny_vanilla_outputs[0]
  eos = expected[9]
  eos_config = config.__class__(**{**config.__dict__, 'eos_token_ids': (eos,)})
  cases = ((config, tiny.MAX_NEW, expected), (config, 7, expected[:7]),
           (eos_config, tiny.MAX_NEW, expected[:expected.index(eos) + 1]))
  for model_config, max_new, want in cases:
    decoder = Decoder(params, model_config, strategies.build(method, model_config, **settings))
    runs = []
    out = decoder.generate(prompt, max_new, on_tokens=runs.append)
    assert [t for run in runs for t in run] == out.token_ids
    assert out.token_ids == want
    assert len(runs) >= 2 and len(runs[0]) == 1  # the prefill's token first, then segments'
    assert 0 < out.first_token_seconds < out.decode_seconds
  assert decoder.generate(prompt, 7).first_token_seconds is None  # not streamed: not waited for


@pytest.mark.parametrize('layers', LAYER_PROGRAMS)
def test_no_retrace_across_prompts_and_skip_sets(tiny_model, monkeypatch, layers):
  """After warm-up, new skip sets and acceptance counts reuse the compiled functions."""
  config, params = tiny_model
  for name in ('_prefill', '_round', '_choose_skip_set'):
    monkeypatch.setattr(engine, name, chex.assert_max_traces(getattr(engine, name), n=1))
  decoder = _decoder_of(layers, monkeypatch, params, config, strategies.build(
      'clasp', config, skip_layers=2, num_draft_tokens=4, draft_exit_threshold=0.0, loi=1))
  outs = [decoder.generate(p, tiny.MAX_NEW) for p in tiny.prompts(config, count=3)]
  skip_sets = {tuple(s) for o in outs for s in o.skip_sets.tolist()}
  assert len(skip_sets) > 1  # the DP really moved the skip set
  assert len({a for o in outs for a in o.accept_lengths}) > 1
  chex.clear_trace_counter()


@pytest.mark.parametrize('layers', LAYER_PROGRAMS)
def test_compile_ahead_leaves_nothing_to_compile(tiny_model, layers, monkeypatch, caplog):
  """After `Decoder.compile` for two prompt buckets, generations in both compile nothing,
  whatever M `auto` moves to: neither the decoder's own programs (whose seconds it counts)
  nor any other (JAX's log of every compile says so; a skip set put on the device with
  `jnp.asarray` compiled a program per new M)."""
  config, params = tiny_model
  # `auto` on a grid of two M: where drafts run the active layers alone (the accelerators'
  # program) a drafting program each, compiled ahead; elsewhere one for both.
  strategy = strategies.AdaptiveClasp(candidates=(2, 4), initial_skip_layers=2,
                                      num_draft_tokens=4, draft_exit_threshold=0.0)
  decoder = _decoder_of(layers, monkeypatch, params, config, strategy)
  programs = decoder._programs(20, 8)  # pylint: disable=protected-access
  drafts = [name for name, _, _ in programs if name.startswith('draft')]
  assert drafts == (['draft M=2', 'draft M=4'] if decoder.drafts_active_layers else ['draft'])
  if jax.default_backend() == 'cpu':
    assert decoder.drafts_active_layers == (layers == 'unrolled')
  tiny.set_costs(decoder)
  prompts = [tiny.prompts(config, count=1, length=n)[0] for n in (20, 40)]  # buckets 32, 64
  for prompt in prompts:
    assert decoder.compile(len(prompt), tiny.MAX_NEW) > 0
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    skip_counts = set()
    for prompt in prompts * 2:
      out = decoder.generate(prompt, tiny.MAX_NEW)
      assert out.compile_seconds == 0.0
      skip_counts.update(m for m in out.skip_layers_per_round if m is not None)
  assert skip_counts == {2, 4}
  assert not [r.getMessage() for r in caplog.records if 'Compiling' in r.getMessage()]
  assert decoder.compile(len(prompts[0]), tiny.MAX_NEW) == 0.0


def test_a_segment_runs_at_least_one_round(tiny_model):
  """A segment of no round is refused where it is made (a GPU program run for nothing,
  which also slowed its later runs), and a policy setting that would make one where the
  decoder is built."""
  with pytest.raises(ValueError, match='at least one round, got rounds=0'):
    strategies.Segment(draft=False, rounds=0)
  assert strategies.Segment(draft=False, rounds=1).rounds == 1
  config, params = tiny_model
  with pytest.raises(ValueError, match='probe_rounds must be >= 1, got 0'):
    Decoder(params, config, strategies.AdaptiveClasp(candidates=(2, 4), initial_skip_layers=2,
                                                     probe_rounds=0))


@pytest.mark.parametrize('layers', ['stacked', 'unrolled'])
def test_first_runs_run_each_program_once_and_change_nothing(tiny_model, layers, monkeypatch):
  """`Decoder.compile` with `first_runs` (a GPU's default) runs each of the request's programs
  once after compiling them (a segment for one round), with the programs compiled and nothing
  more; a call that compiles nothing runs none; generations after it give plain decoding's
  tokens, compiling nothing."""
  config, params = tiny_model
  strategy = strategies.AdaptiveClasp(candidates=(2, 4), initial_skip_layers=2,
                                      num_draft_tokens=4, draft_exit_threshold=0.0)
  decoders = [_decoder_of(layers, monkeypatch, params, config, strategy) for _ in range(2)]
  ran, rounds = [], {}
  first_run_args = engine._first_run_args  # pylint: disable=protected-access

  def recorded(name, *args):
    ran.append(name)
    run_args = first_run_args(name, *args)
    if name not in ('prefill', 'refresh'):  # a segment: (params, state, budget, rounds, period)
      rounds[name] = int(run_args[3])
    return run_args

  monkeypatch.setattr(engine, '_first_run_args', recorded)
  prompt = tiny.prompts(config, count=1)[0]
  assert decoders[0].compile(len(prompt), tiny.MAX_NEW, first_runs=True) > 0
  assert decoders[1].compile(len(prompt), tiny.MAX_NEW, first_runs=False) > 0
  programs = list(decoders[0]._programs(len(prompt), tiny.MAX_NEW))  # pylint: disable=protected-access
  assert ran == [name for name, _, _ in programs]
  assert {'prefill', 'plain', 'refresh'} <= set(ran) and any(n.startswith('draft') for n in ran)
  assert set(rounds.values()) == {1}, rounds

  def executables(decoder):  # pylint: disable=protected-access
    return sum(len(f._compiled) for f in {id(f): f for _, f, _ in decoder._programs(
        len(prompt), tiny.MAX_NEW)}.values())

  assert executables(decoders[0]) == executables(decoders[1])
  assert decoders[0].compile(len(prompt), tiny.MAX_NEW, first_runs=True) == 0.0
  assert len(ran) == len(programs)
  plain = Decoder(params, config, strategies.Vanilla()).generate(prompt, tiny.MAX_NEW)
  for decoder in decoders:
    tiny.set_costs(decoder)
    out = decoder.generate(prompt, tiny.MAX_NEW)
    assert out.token_ids == plain.token_ids and out.compile_seconds == 0.0


def test_a_prefill_in_chunks_starts_where_one_pass_does(tiny_model, monkeypatch):
  """A prompt run as passes of 32 tokens (`engine.prefill_chunk`, patched: any backend)
  leaves the cache rows, the first token and the target hidden state of one pass over the
  whole bucket (to float32 rounding), and decoding goes on to the same tokens; prompts of
  whole chunks, and of chunks and a rest run as passes of 8 tokens or as one more chunk."""
  config, params = tiny_model
  monkeypatch.setattr(engine, 'prefill_chunk', lambda: None)
  whole = Decoder(params, config, strategies.Vanilla())
  monkeypatch.setattr(engine, 'prefill_chunk', lambda: 32)
  chunked = Decoder(params, config, strategies.Vanilla())
  # A 128-token bucket: 3 passes of 32; 3 and one of 8; 3 and three of 8; 4 (a rest of 31
  # would take four passes of 8), the last part-full.
  for length in (96, 100, 120, 127):
    prompt = tiny.prompts(config, count=1, length=length)[0]
    a, b = whole.start(prompt, 8), chunked.start(prompt, 8)
    np.testing.assert_allclose(b.cache.k_LBSKh[:, :, :length], a.cache.k_LBSKh[:, :, :length],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b.target_hidden_LD, a.target_hidden_LD, rtol=1e-4, atol=1e-4)
    assert (int(b.cache.length), int(b.num_tokens)) == (length, length + 1)
    assert (whole.generate(prompt, tiny.MAX_NEW).token_ids
            == chunked.generate(prompt, tiny.MAX_NEW).token_ids)


@pytest.mark.skipif(jax.default_backend() != 'cpu',
                    reason="reads XLA:CPU's programs, where a product stays a dot")
@pytest.mark.parametrize('logits_by_row', [True, False])
def test_logits_by_row_compute_the_lm_head_one_row_at_a_time(tiny_model, logits_by_row):
  """With `logits_by_row` no program of a decoder runs the LM head over a pass's W rows: a
  plain step's head is a 1-row product (and without it, a W-row one)."""
  config, params = tiny_model
  decoder = Decoder(params, config, strategies.build('pld', config),
                    logits_by_row=logits_by_row)
  W, V = decoder.pass_width, config.vocab_size
  heads = {}
  for name, function, args in decoder._programs(20, 8):  # pylint: disable=protected-access
    if name != 'prefill':
      text = function.compiled(*args).as_text()
      heads[name] = {rows for rows in (1, W)
                     if re.search(rf'= f32\[{rows},{V}\]\S* dot\(', text)}
  assert heads == dict.fromkeys(('plain', 'draft'), {1} if logits_by_row else {W})


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the options of CPU programs')
def test_cpu_programs_hold_no_ynnpack_fusion(tiny_model):
  """On a CPU every program that runs the model has YNNPACK's fusions off
  (`xla_options.CPU_COMPILER_OPTIONS`): a decoder's, the prefill and the drafting segments
  among them, and ConfLayers' confidence pass."""
  config, params = tiny_model
  decoder = Decoder(params, config, strategies.build('conflayers', config))
  for name, function, args in decoder._programs(20, 8):  # pylint: disable=protected-access
    assert '__ynn_fusion' not in function.compiled(*args).as_text(), name
  state = decoder.start(tiny.prompts(config, count=1)[0], 8)
  policy = decoder.strategy.make_policy(decoder, 8)
  program = policy._confidence  # pylint: disable=protected-access
  assert '__ynn_fusion' not in program.lower(decoder.params, state=state).compile().as_text()


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the layouts of CPU programs')
@pytest.mark.parametrize('per_layer_params,pass_width', [(False, 1), (False, None), (True, 9)],
                         ids=['width_1', 'default_width', 'per_layer_params_at_width_9'])
def test_cpu_programs_over_per_layer_buffers_copy_no_cache(tiny_model, per_layer_params,
                                                            pass_width):
  """On a CPU, passes of up to 5 rows (the default 3 among them) run on per-layer buffers and
  wider ones on the stacked layout (`model.per_layer_by_default`). A plain step over per-layer
  buffers, a layer loop (`model.scan_layers`), copies no whole KV cache (unrolled, XLA's CPU
  compiler copied it four times a step). That holds too for params loaded per layer
  (`load(per_layer=True)`) in a decoder of a wide pass, which keeps them."""
  config, params = tiny_model
  assert not Decoder(params, config, strategies.Vanilla(), pass_width=9).fast_path
  assert Decoder(params, config, strategies.Vanilla(), pass_width=5).fast_path
  if per_layer_params:
    params = model_lib.unstack_layers(params)
  decoder = Decoder(params, config, strategies.Vanilla(), pass_width=pass_width)
  assert decoder.fast_path == (not per_layer_params)
  assert model_lib.is_per_layer(decoder.params)
  # pylint: disable-next=protected-access
  programs = {name: (function, args) for name, function, args in decoder._programs(20, 8)}
  plain, args = programs['plain']
  cache_shape = ','.join(map(str, args[1].cache.k_LBSKh.shape))
  text = plain.compiled(*args).as_text()
  assert re.search(rf'f32\[{cache_shape}\]', text)
  assert not re.search(rf'= f32\[{cache_shape}\]\S* copy\(', text)


def test_lowering_for_an_accelerator_builds_its_program_not_this_machines(tiny_model):
  """`Decoder.lower` builds the program of the platform it names: on any machine, per-layer
  buffers lowered for a GPU are unrolled and for a CPU a layer loop whose products switch
  between the layers' buffers (`model.scan_layers`), whatever was traced or compiled before.
  (The plain `jnp` attention, which both platforms run: a GPU's Pallas kernel has no CPU
  lowering.)"""
  config, params = tiny_model
  decoder = Decoder(params, config, strategies.Vanilla(), fast_path=True, attention='xla')

  def switches(platform):
    return decoder.lower(20, 8, platform)['plain'].as_text().count('stablehlo.case')

  assert switches('cpu') == 4  # q/k/v, o, gate/up and down
  assert switches('cuda') == 0
  decoder.compile(20, 8)
  assert (switches('cuda'), switches('cpu')) == (0, 4)


def test_lowering_for_an_accelerator_drafts_as_it_does(tiny_model):
  """`Decoder.lower` for a GPU builds a draft program per M over the active layers' own
  buffers, as a decoder on a GPU runs its drafts, though on this machine (a CPU) the same
  decoder drafts with one program for every M; lowered for a CPU, that one program."""
  config, params = tiny_model
  static = strategies.build('static', config, skip_layers=1, num_draft_tokens=2)
  decoder = Decoder(params, config, static, fast_path=True, attention='xla')
  assert not decoder.drafts_active_layers
  assert 'draft M=1' in decoder.lower(20, 8, 'cuda')
  assert 'draft' in decoder.lower(20, 8, 'cpu')


@pytest.mark.parametrize('prompt,max_new,match', [
    ([], 10, 'empty'),
    ([5] * 500, 100, 'exceeds the model context'),
    ([5, 6], 0, 'max_new_tokens'),
    ([5, 1000], 4, 'token ids'),
])
def test_bad_requests(tiny_model, prompt, max_new, match):
  config, params = tiny_model
  with pytest.raises(ValueError, match=match):
    Decoder(params, config, strategies.Vanilla()).generate(prompt, max_new)


@pytest.mark.parametrize('seed', [2**31, -2**31 - 1])
def test_a_seed_beyond_32_bits_is_refused(tiny_model, seed):
  config, params = tiny_model
  with pytest.raises(ValueError, match='seed must fit in 32 bits'):
    Decoder(params, config, strategies.Vanilla()).generate([5, 6], 4, seed=seed)


@pytest.mark.parametrize('method,settings,match', [
    ('clasp', dict(skip_layers=6), r'\[0, L\)'),
    ('clasp', dict(skip_layers=-1), r'\[0, L\)'),
    ('clasp', dict(num_draft_tokens=0), 'num_draft_tokens'),
    ('clasp', dict(draft_exit_threshold=1.5), 'draft_exit_threshold'),
    ('clasp', dict(loi=0), 'loi'),
    ('clasp', dict(skip_set=(1,)), 'static'),
    ('clasp', dict(skip_layers=2, skip_ratio=0.5), 'not both'),
    ('static', dict(skip_set=(0, 9)), 'outside'),
    ('nope', {}, 'unknown method'),
])
def test_bad_strategy_settings(tiny_model, method, settings, match):
  config, _ = tiny_model
  with pytest.raises(ValueError, match=match):
    strategies.build(method, config, **settings)


@pytest.mark.parametrize('settings,match', [
    (dict(temperature=-1.0), 'temperature'),
    (dict(temperature=1.0, top_p=0.0), 'top_p'),
    (dict(temperature=1.0, top_p=1.5), 'top_p'),
    (dict(temperature=0.0, top_k=5), 'greedy'),
])
def test_bad_sampling_settings(settings, match):
  with pytest.raises(ValueError, match=match):
    SamplingConfig(**settings)


@pytest.mark.parametrize('method,settings', [
    ('vanilla', {}),
    ('clasp', dict(skip_layers=2, num_draft_tokens=4, draft_exit_threshold=0.0, loi=1)),
    ('clasp', dict(skip_layers=3, num_draft_tokens=8, draft_exit_threshold=0.3, loi=3)),
    ('static', dict(skip_set=(1, 4), num_draft_tokens=6, draft_exit_threshold=0.1)),
])  # settings of test_greedy_is_identical_to_vanilla: its reference-path programs serve here
def test_fast_path_equals_reference_path(tiny_model, tiny_vanilla_outputs, method,
                                         settings):
  """The accelerator path (gathered active layers, unrolled) gives the reference's tokens,
  accepted lengths and skip sets."""
  config, params = tiny_model
  strategy = strategies.build(method, config, **settings)
  reference = Decoder(params, config, strategy, fast_path=False)
  fast = Decoder(params, config, strategy, fast_path=True)
  for prompt, expected in zip(tiny.prompts(config), tiny_vanilla_outputs):
    ref_out = reference.generate(prompt, tiny.MAX_NEW)
    fast_out = fast.generate(prompt, tiny.MAX_NEW)
    assert fast_out.token_ids == ref_out.token_ids == expected
    assert fast_out.accept_lengths == ref_out.accept_lengths
    np.testing.assert_array_equal(fast_out.skip_sets, ref_out.skip_sets)


def test_hybrid_drafts_from_the_context_and_the_skipped_model(tiny_model, tiny_vanilla_outputs):
  """clasp's default: a round with an n-gram match in the context takes its drafts from
  there, the others draft with layers skipped; the tokens are plain decoding's either way."""
  config, params = tiny_model
  decoder = Decoder(params, config, strategies.build(
      'clasp', config, skip_layers=2, num_draft_tokens=4, draft_exit_threshold=0.0, loi=2))
  sources = set()
  for prompt, expected in zip(tiny.prompts(config), tiny_vanilla_outputs):
    out = decoder.generate(prompt, tiny.MAX_NEW)
    assert out.token_ids == expected
    assert len(out.draft_sources) == len(out.accept_lengths)
    sources |= set(out.draft_sources)
  assert sources == {'lookup', 'skip'}


def test_lookup_rounds_do_not_use_up_a_refresh_period(tiny_model):
  """A refresh period of LOI rounds counts the rounds that draft with layers skipped: rounds
  with a lookup match between them copy their drafts and need no skip set. (A segment runs
  on through the refreshes that keep the skip set: whole periods.)"""
  config, params = tiny_model
  loi = 2
  decoder = Decoder(params, config, strategies.build(
      'clasp', config, skip_layers=2, num_draft_tokens=4, draft_exit_threshold=0.0, loi=loi))
  refresh = decoder.refresh
  starts = []  # the round at which each segment (whole refresh periods) started

  def recording_refresh(state, num_skip):
    starts.append(int(state.num_rounds))
    return refresh(state, num_skip)

  decoder.refresh = recording_refresh
  periods_with_lookup = 0
  for prompt in tiny.prompts(config):
    starts.clear()
    sources = decoder.generate(prompt, tiny.MAX_NEW).draft_sources
    periods = [sources[a:b] for a, b in zip(starts, starts[1:] + [len(sources)])]
    for period in periods[:-1]:  # the last one may end with the token budget
      counted = sum(s != 'lookup' for s in period)
      assert counted and counted % loi == 0, period
      periods_with_lookup += 'lookup' in period
  assert periods_with_lookup


@pytest.mark.parametrize('name', ['auto', 'xla'])
def test_the_dp_attends_with_the_decoders_kind_of_attention(tiny_model, name):
  """The skip-set refresh gets the prefix attention of the decoder's kind (on a GPU the fused
  kernel, as the passes; here the jnp reference)."""
  config, params = tiny_model
  handed = []

  class Recording(strategies.Clasp):
    def refresh(self, params, config, state, num_skip, attention=None):
      handed.append(attention)
      return super().refresh(params, config, state, num_skip, attention=attention)

  decoder = Decoder(params, config, Recording(num_skip=2, num_draft_tokens=4,
                                              draft_exit_threshold=0.0), attention=name)
  decoder.generate(tiny.prompts(config)[0], 4)
  assert handed and handed[0] is engine.resolve_attention(name, config, prefix=True)
  assert engine.resolve_attention('xla', prefix=True) is not engine.resolve_attention('xla')


def test_a_segment_reports_its_state(tiny_model):
  """What the host reads of a segment (its report) is the state it leaves: the tokens, the
  rounds' statistics and the DP's newest table, readable after the state is donated."""
  config, params = tiny_model
  decoder = Decoder(params, config, strategies.Clasp(num_skip=2, num_draft_tokens=4,
                                                     draft_exit_threshold=0.0, lookup=False),
                    pass_width=16)  # rows to spare: the DP rides in the verify passes
  state = decoder.refresh(decoder.start(tiny.prompts(config)[0], 64), 2)
  state, report = decoder.run_segment(state, strategies.Segment(draft=True, rounds=3), 64)
  expected = dict(done=state.done, num_rounds=state.num_rounds, num_tokens=state.num_tokens,
                  tokens_N=state.tokens_N, accepted_R=state.accepted_R,
                  drafted_R=state.drafted_R, source_R=state.source_R, skip_L=state.skip_L,
                  tables_completed=state.search.completed, table_LJ=state.search.ready_LJ)
  expected = {name: np.asarray(x) for name, x in expected.items()}  # before it is donated
  decoder.run_segment(state, strategies.Segment(draft=True, rounds=1), 64)
  assert int(report.num_rounds) == 3 and int(report.tables_completed) >= 1
  for name, value in expected.items():
    np.testing.assert_array_equal(np.asarray(getattr(report, name)), value, err_msg=name)


def test_only_a_strategy_that_reads_hidden_states_stacks_them(tiny_model):
  """A plain step's program stacks every layer's output only for a strategy whose refresh
  reads them (CLaSp's DP): plain decoding's compiled program has no such stack."""
  config, params = tiny_model

  def stacks(strategy):
    decoder = Decoder(params, config, strategy, fast_path=True, logits_by_row=False)
    text = decoder.lower(20, 8, 'cpu')['plain'].compile().as_text()
    return len(re.findall(rf'= f32\[{config.num_layers + 1},[^\n]*concatenate\(', text))

  assert not strategies.Vanilla().reads_hidden_states
  assert stacks(strategies.Vanilla()) == 0
  clasp = strategies.Clasp(num_skip=2, num_draft_tokens=4, draft_exit_threshold=0.0)
  assert clasp.reads_hidden_states and stacks(clasp) == 1


@pytest.mark.parametrize('kind', ['plain', 'lookup'])
def test_clasp_keeps_the_last_tokens_hidden_states_through_any_segment(tiny_model, kind):
  """CLaSp's refresh reads the last accepted token's hidden states, so its plain and prompt
  lookup segments keep them too (a lookup segment runs prompt lookup's rounds, a strategy
  that reads none); plain decoding's segments leave the prefill's as they were."""
  config, params = tiny_model
  prompt = tiny.prompts(config)[0]
  segment = strategies.Segment(draft=kind == 'lookup', rounds=2, lookup_only=kind == 'lookup')
  for strategy, kept in [(strategies.Clasp(num_skip=2, num_draft_tokens=4,
                                           draft_exit_threshold=0.0), True),
                         (strategies.Vanilla(), False)]:
    if kind == 'lookup' and not kept:
      continue  # plain decoding runs no lookup segment
    decoder = Decoder(params, config, strategy)
    state = decoder.start(prompt, 64)
    before_LD = np.asarray(state.target_hidden_LD)
    state, _ = decoder.run_segment(state, segment, 64)
    changed = not np.array_equal(np.asarray(state.target_hidden_LD), before_LD)
    assert changed == kept, type(strategy).__name__


def test_a_plain_segment_records_its_rounds_at_its_end(tiny_model):
  """A plain segment writes its rounds' records once, after its loop: one token committed
  and none drafted per round, the source 'plain' and the skip set in force, the rounds
  before it as they were, the rounds after it not written."""
  config, params = tiny_model
  decoder = Decoder(params, config, strategies.StaticSkip(skip_layers=(1, 3), num_draft_tokens=4,
                                                          draft_exit_threshold=0.0))
  state = decoder.put_skip_set(decoder.start(tiny.prompts(config)[0], 64),
                               np.isin(np.arange(config.num_layers), (1, 3)))
  state, _ = decoder.run_segment(state, strategies.Segment(draft=True, rounds=2), 64)
  before = {name: np.asarray(getattr(state, name))
            for name in ('accepted_R', 'drafted_R', 'source_R', 'skip_RL')}
  state, report = decoder.run_segment(state, strategies.Segment(draft=False, rounds=3), 64)
  assert int(report.num_rounds) == 5
  np.testing.assert_array_equal(np.asarray(report.accepted_R)[:5],
                                np.r_[before['accepted_R'][:2], 1, 1, 1])
  np.testing.assert_array_equal(np.asarray(report.drafted_R)[:5],
                                np.r_[before['drafted_R'][:2], 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(report.source_R)[:5],
                                np.r_[before['source_R'][:2], [PLAIN] * 3])
  assert (before['source_R'][:2] == SKIP).all()
  skip_RL = np.asarray(state.skip_RL)
  np.testing.assert_array_equal(skip_RL[:2], before['skip_RL'][:2])
  assert (skip_RL[2:5] == np.isin(np.arange(config.num_layers), (1, 3))).all()
  assert not np.asarray(report.accepted_R)[5:].any() and not skip_RL[5:].any()


@pytest.mark.parametrize('layers', LAYER_PROGRAMS)
def test_segments_end_only_where_the_skip_set_changes(tiny_model, monkeypatch, layers):
  """Where the verify passes fill the DP's table, CLaSp's rounds run on through the refreshes
  that keep the skip set: the same tokens and skip sets, round by round, as segments that
  return to the host at every refresh, with one segment per set in force. The device puts a
  new set in force itself: the host sends none after the first, and every drafting segment
  runs the weights of the layers the state says are active."""
  config, params = tiny_model
  decoder = _decoder_of(layers, monkeypatch, params, config,
                        strategies.Clasp(num_skip=2, num_draft_tokens=4,
                                         draft_exit_threshold=0.0, loi=1, lookup=False),
                        pass_width=16)
  segments, puts = [], []
  run_segment, put_skip_set = decoder.run_segment, decoder.put_skip_set

  def counted(state, segment, max_new_tokens):
    segments.append(segment)
    if decoder.drafts_active_layers:  # its buffers are those layers' (before the donation)
      ids_A = np.asarray(state.draft_ids_A)
      layers = decoder._round_params['draft_layers']  # pylint: disable=protected-access
      assert all(w is decoder.params['layers'][i] for w, i in zip(layers, ids_A, strict=True))
    return run_segment(state, segment, max_new_tokens)

  def put_counted(state, skip_L):
    puts.append(skip_L)
    return put_skip_set(state, skip_L)

  monkeypatch.setattr(decoder, 'run_segment', counted)
  monkeypatch.setattr(decoder, 'put_skip_set', put_counted)
  prompt = tiny.prompts(config)[1]
  on_change = decoder.generate(prompt, 64)
  assert all(s.rounds is None and s.refresh_every == 1 for s in segments)
  assert len(puts) == 1  # the first refresh's set; the device put every later one in force
  on_change_segments, segments[:], puts[:] = len(segments), [], []
  every_refresh = strategies.Segment(draft=True, rounds=1)
  monkeypatch.setattr(strategies.base.SchedulePolicy, 'next_segment',
                      lambda self, decoder, state: (decoder.refresh(state, 2), every_refresh))
  each = decoder.generate(prompt, 64)
  assert on_change.token_ids == each.token_ids
  np.testing.assert_array_equal(on_change.skip_sets, each.skip_sets)
  changes = _skip_set_changes(each.skip_sets)
  assert 1 <= changes < len(each.accept_lengths) - 1  # the set both changed and stayed
  assert on_change_segments == 1 + changes
  assert len(segments) == len(each.accept_lengths)
  assert len(puts) == 1 + changes  # from the host, at each change


@pytest.mark.skipif(jax.default_backend() == 'gpu', reason='the kernels run on a GPU')
def test_the_gpu_kernels_are_refused_off_a_gpu_before_any_compile(tiny_model):
  """A decoder of the fused GPU kernels builds anywhere and lowers for a GPU from anywhere;
  compiling or running it here is a one-line error, not a failure inside the lowering."""
  config, params = tiny_model
  decoder = Decoder(params, config, strategies.Vanilla(), attention='pallas')
  assert 'plain' in decoder.lower(20, 8, 'cuda')
  message = ("attention='pallas' is the fused GPU kernel; this machine runs on "
             f'{jax.default_backend()}')
  for build in (lambda: decoder.compile(20, 8), lambda: decoder.generate([1, 2, 3], 4),
                lambda: decoder.start([1, 2, 3], 4)):
    with pytest.raises(ValueError, match=message):
      build()
  assert decoder.compile_seconds == 0.0
