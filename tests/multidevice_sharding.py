"""Sharded runs on 8 host devices: run by `test_sharding.py` in a pytest process of its own,
under XLA_FLAGS=--xla_force_host_platform_device_count=8 (skipped with fewer devices).

On meshes of 2 and 4 devices (KV heads split, then each held by two devices) the tiny
model's tokens equal the single-device run's (`CASES`, compiled ahead with first runs); params
and cache carry the rules' shardings; the loaders and the planted benchmark models place
weights straight into them; a bad mesh stops a load before any weight is read; the Pallas
kernel runs per device on its own heads.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from clasp_jax import attention
from clasp_jax import attention_pallas
from clasp_jax import model as model_lib
from clasp_jax import sharding
from clasp_jax import strategies
from clasp_jax import weights
from clasp_jax.weights import hf
from clasp_jax.bench import planted
from clasp_jax.engine import Decoder
import tiny

if jax.device_count() < 8:
  pytest.skip('needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8',
              allow_module_level=True)

METHODS = {
    'vanilla': ('vanilla', {}),
    'clasp': ('clasp', dict(skip_layers=2, num_draft_tokens=4, draft_exit_threshold=0.0, loi=1)),
    'pld': ('pld', dict(num_draft_tokens=5)),
}
# (method, mesh, fast_path): CLaSp, whose draft runs the active layers' own buffers, on meshes
# of 2 and 4 on both layer paths (its decoder also runs plain rounds, and lookup rounds where
# the context has a match); plain decoding and prompt lookup on the mesh of 4 (KV heads each
# held by two devices), on the reference path. A mesh of one device is a single-device run
# with placement: `Decoder(mesh='tp:1')` is left out, as it compiled another fast-path CLaSp
# program for no rule the others do not apply.
CASES = ([('clasp', mesh, fast_path) for fast_path in (False, True) for mesh in ('tp:2', 'tp:4')]
         + [(name, 'tp:4', False) for name in ('vanilla', 'pld')])
PROMPTS = 2
#: New tokens per generation: enough for several refresh periods and lookup rounds per
#: prompt (the single-device tests run tiny.MAX_NEW); 8 host devices on 2 cores run slowly.
MAX_NEW = 24


@pytest.fixture(scope='module')
def single_device(tiny_model):
  """Plain decoding's tokens on one device (no mesh), per layer path."""
  config, params = tiny_model
  return {fast_path: [Decoder(params, config, strategies.Vanilla(), fast_path=fast_path)
                      .generate(p, MAX_NEW).token_ids
                      for p in tiny.prompts(config, count=PROMPTS)]
          for fast_path in (False, True)}


@pytest.mark.parametrize('name,mesh,fast_path', CASES)
def test_tokens_equal_the_single_device_run(tiny_model, single_device, name, mesh, fast_path):
  config, params = tiny_model
  method, settings = METHODS[name]
  decoder = Decoder(params, config, strategies.build(method, config, **settings),
                    fast_path=fast_path, mesh=mesh)
  prompts = tiny.prompts(config, count=PROMPTS)
  decoder.compile(len(prompts[0]), MAX_NEW, first_runs=True)  # each program run on the mesh
  outs = [decoder.generate(p, MAX_NEW) for p in prompts]
  assert [o.token_ids for o in outs] == single_device[fast_path]
  assert all(o.compile_seconds == 0 for o in outs)
  if name != 'vanilla':
    assert any(d > 0 for o in outs for d in o.draft_lengths)  # it did draft


@pytest.mark.parametrize('unrolled', [False, True], ids=['layer_loop', 'unrolled'])
def test_lossless_within_a_mesh_in_bfloat16(tiny_model, unrolled, monkeypatch):
  """bfloat16 on 2 devices: CLaSp equals plain decoding on the same mesh token for token (the
  mesh's tokens may part from one device's at near-ties: the projections' partial sums are
  added across devices in another order), per-layer buffers in the CPU's layer loop and
  unrolled, as accelerators run them."""
  if unrolled:
    monkeypatch.setattr(model_lib, 'loops_over_layers', lambda: False)
  config, params = tiny_model
  params = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
  prompts = tiny.prompts(config, count=PROMPTS)
  plain, clasp = (Decoder(params, config, strategies.build(method, config, **settings),
                          fast_path=True, mesh='tp:2')
                  for method, settings in (METHODS['vanilla'], METHODS['clasp']))
  assert ([clasp.generate(p, MAX_NEW).token_ids for p in prompts]
          == [plain.generate(p, MAX_NEW).token_ids for p in prompts])


def _assert_placed_by_the_rules(tree, config, mesh):
  expected = sharding.tree_shardings(tree, config, mesh)
  for (path, leaf), want in zip(jax.tree_util.tree_leaves_with_path(tree),
                                jax.tree.leaves(expected)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), jax.tree_util.keystr(path)


@pytest.mark.parametrize('fast_path', [False, True])
def test_params_and_cache_carry_the_rules_shardings(tiny_model, fast_path):
  config, params = tiny_model
  decoder = Decoder(params, config, strategies.build('clasp', config, **METHODS['clasp'][1]),
                    fast_path=fast_path, mesh='tp:4')
  mesh = decoder.mesh
  _assert_placed_by_the_rules(decoder.params, config, mesh)
  view = sharding.rules_mesh(config, mesh)  # [2 KV heads, 2 devices each]
  assert view.devices.shape == (2, 2)
  layer = decoder.params['layers'][0] if fast_path else decoder.params['layers']
  wq, wk = layer['wq'], layer['wk']  # q/k/v unfused: 4 devices, 2 KV heads
  assert wq.sharding.spec[-1] == ('tp', 'kv_replica') and wk.sharding.spec[-1] == 'tp'
  assert wq.addressable_shards[0].data.shape[-1] == config.num_heads * config.head_dim // 4
  assert wk.addressable_shards[0].data.shape[-1] == config.head_dim
  state = decoder.start(tiny.prompts(config)[0], 40)
  state, _ = decoder.run_segment(decoder.refresh(state, 2), strategies.base.Segment(True, 2),
                                40)
  _assert_placed_by_the_rules(state, config, mesh)
  assert state.cache.k_LBSKh.sharding.is_equivalent_to(
      NamedSharding(view, P(None, None, None, 'tp', None)), 5)
  assert state.cache.k_LBSKh.addressable_shards[0].data.shape[3] == 1  # one KV head each


def test_planted_params_are_built_in_their_shards(tiny_model):
  """`planted.build_params` on a mesh: every weight where the rules put it, holding the
  one-device model's values (fused per shard as `model.fuse_projections` lays them out)."""
  spec = planted.planted_model(tiny_model[0], epsilon=0.1)
  config, mesh = spec.config, sharding.make_mesh('tp:2')
  sharded = planted.build_params(spec, per_layer=True, mesh=mesh)
  _assert_placed_by_the_rules(sharded, config, mesh)
  one = planted.build_params(spec)  # stacked, one device
  for name in ('embed', 'final_norm', 'lm_head'):
    np.testing.assert_array_equal(sharded[name], one[name], err_msg=name)
  for i, lp in enumerate(sharded['layers']):
    expected = model_lib.fuse_projections(model_lib.layer_params(one, i), 2,
                                          sharding.fuse_qkv(config, 2))
    assert lp.keys() == expected.keys()
    for name in lp:
      np.testing.assert_array_equal(lp[name], expected[name], err_msg=f'layer {i} {name}')


def test_fused_params_on_two_devices(tiny_model):
  config, params = tiny_model
  decoder = Decoder(params, config, strategies.Vanilla(), fast_path=True, mesh='tp:2')
  layer = decoder.params['layers'][0]
  assert layer['w_qkv'].sharding.spec == P(None, 'tp', None)
  # Each device holds its own 2 query heads, 1 KV head's keys and 1's values.
  assert layer['w_qkv'].addressable_shards[1].data.shape == (64, 1, (2 + 1 + 1) * 16)
  assert layer['w_gate_up'].addressable_shards[1].data.shape == (64, 1, 128)
  with pytest.raises(ValueError, match='fused for 2 devices, the mesh has 4'):
    Decoder(decoder.params, config, strategies.Vanilla(), mesh='tp:4')


def test_bad_mesh_is_an_error(tiny_model):
  config, params = tiny_model
  with pytest.raises(ValueError, match='mesh tp:16 needs 16 devices; 8 available'):
    Decoder(params, config, strategies.Vanilla(), mesh='tp:16')
  with pytest.raises(ValueError, match=r'num_heads \(4\) must be divisible'):
    Decoder(params, config, strategies.Vanilla(), mesh='tp:8')


def test_a_bad_mesh_stops_a_load_before_any_weight_is_read(tiny_hf_checkpoint, monkeypatch):
  def never(*unused_args):
    raise AssertionError('a weight was read')

  monkeypatch.setattr(hf, '_params', never)
  with pytest.raises(ValueError, match=r'^num_heads \(4\) must be divisible by the '
                                       r'tensor-parallel size \(8\)'):
    weights.load(tiny_hf_checkpoint, mesh='tp:8')


@pytest.mark.parametrize('per_layer', [False, True])
def test_load_places_weights_straight_into_their_shardings(tiny_hf_checkpoint, tmp_path,
                                                           per_layer):
  """From the safetensors folder, then from the orbax cache: values as loaded on one device
  (fused for two shards in the per-layer layout), every leaf on the mesh by the rules."""
  plain = weights.load(tiny_hf_checkpoint, per_layer=False).params
  if per_layer:
    plain = model_lib.unstack_layers(plain, num_shards=2)
  for _ in range(2):  # converts and saves, then restores the cache entry
    model = weights.load(tiny_hf_checkpoint, mesh='tp:2', per_layer=per_layer,
                         cache_dir=str(tmp_path))
    _assert_placed_by_the_rules(model.params, model.config, model.mesh)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(plain)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert model.params['embed'].sharding.spec == P('tp', None)  # V 256 splits in two


# Riders: rows 2 and 3 are pseudo-tokens at an earlier position (`attention.Riders`).
RIDERS = [None, attention.Riders(2, jnp.int32(125))]


@pytest.mark.parametrize('riders', RIDERS, ids=['tokens', 'riders'])
@pytest.mark.parametrize('mesh', ['tp:2', 'tp:4'])
def test_pallas_kernel_runs_per_device_on_its_own_heads(mesh, riders):
  config = tiny.tiny_config()
  mesh = sharding.make_mesh(mesh)
  rng = np.random.default_rng(0)
  T, S, start = 4, 256, 130
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  q = normal(1, T, config.num_heads, config.head_dim)
  k, v = (normal(1, T, config.num_kv_heads, config.head_dim) for _ in range(2))
  caches = [normal(2, 1, S, config.num_kv_heads, config.head_dim) for _ in range(2)]
  kernel = functools.partial(attention_pallas.cache_attention_pallas, interpret=True)
  sharded = jax.jit(sharding.shard_attention(kernel, config, mesh, kernel=True))
  out = sharded(q, k, v, *caches, 1, start, riders)
  want = attention.cache_attention(q, k, v, *caches, 1, start, riders)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)


def _packed_per_shard(q_BTHh, k_BTKh, v_BTKh, n):
  """q, k and v packed as the fused q/k/v product lays them out over n shards: [B, T, n,
  H/n + 2 KV/n, hd], shard i's query, key and value heads side by side."""
  B, T, _, hd = q_BTHh.shape
  return jnp.stack([jnp.concatenate([x.reshape(B, T, n, -1, hd)[:, :, i]
                                     for x in (q_BTHh, k_BTKh, v_BTKh)], axis=2)
                    for i in range(n)], axis=2)


@pytest.mark.parametrize('riders', RIDERS, ids=['tokens', 'riders'])
def test_pallas_kernel_reads_each_devices_packed_heads(riders):
  """q, k and v packed per shard (device i's [q_i k_i v_i], as the fused q/k/v product lays
  them out) on 2 devices: the kernel per device gives the one-device reference's output."""
  config = tiny.tiny_config()
  mesh = sharding.make_mesh('tp:2')
  rng = np.random.default_rng(1)
  T, S, start = 4, 256, 130
  H, KV, hd = config.num_heads, config.num_kv_heads, config.head_dim
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  q, k, v = normal(1, T, H, hd), normal(1, T, KV, hd), normal(1, T, KV, hd)
  caches = [normal(2, 1, S, KV, hd) for _ in range(2)]
  packed = _packed_per_shard(q, k, v, 2)
  kernel = functools.partial(attention_pallas.cache_attention_pallas, interpret=True)
  sharded = jax.jit(sharding.shard_attention(kernel, config, mesh, kernel=True))
  out = sharded(packed, None, None, *caches, 1, start, riders)
  want = attention.cache_attention(q, k, v, *caches, 1, start, riders)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('packed', [False, True], ids=['three_arrays', 'packed'])
def test_prompt_attention_runs_per_device_on_its_own_heads(packed):
  """A prompt's one-pass attention (`attention.prompt_attention`, cuDNN's on a GPU, XLA's
  here) per device on 2 devices gives the one-device cache attention's output at position
  0, its q, k and v as three arrays or packed per shard."""
  config = tiny.tiny_config()
  mesh = sharding.make_mesh('tp:2')
  rng = np.random.default_rng(2)
  T, S = 16, 256
  H, KV, hd = config.num_heads, config.num_kv_heads, config.head_dim
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  q, k, v = normal(1, T, H, hd), normal(1, T, KV, hd), normal(1, T, KV, hd)
  caches = [normal(2, 1, S, KV, hd) for _ in range(2)]
  inputs = (q, k, v)
  if packed:
    inputs = (_packed_per_shard(q, k, v, 2), None, None)
  prompt = functools.partial(attention.prompt_attention, implementation='xla')
  sharded = jax.jit(sharding.shard_attention(prompt, config, mesh, kernel=True))
  out = sharded(*inputs, *caches, 1, 0)
  want = attention.cache_attention(q, k, v, *caches, 1, jnp.int32(0))
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
