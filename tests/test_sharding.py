"""Tensor parallelism: mesh specs, the sharding rules on abstract shapes, errors before
compiling, and (in a process of 8 CPU devices, `multidevice_sharding.py`) sharded runs."""

import os
import subprocess
import sys

import jax
from jax.sharding import AbstractMesh, PartitionSpec as P
import pytest

from clasp_jax import model as model_lib
from clasp_jax import sharding
from clasp_jax.cache import init_cache
from clasp_jax.configs import models
import tiny

_HERE = os.path.dirname(os.path.abspath(__file__))
TP2 = ('tp', 'kv_replica')  # every device, on the view of a mesh with more devices than KV


def _mesh(n: int) -> AbstractMesh:
  return AbstractMesh((n,), ('tp',))


@pytest.mark.parametrize('spec,expected', [
    ('tp:2', sharding.MeshSpec(2)), (' tp:16 ', sharding.MeshSpec(16)),
    ('auto', sharding.MeshSpec()), ('', None), (None, None)])
def test_parse_mesh(spec, expected):
  assert sharding.parse_mesh(spec) == expected


@pytest.mark.parametrize('spec', ['tp:0', 'tp:x', 'tp', 'tp:', 'dp:2', 'tp:2,dp:2', '2'])
def test_parse_mesh_rejects(spec):
  with pytest.raises(ValueError, match="mesh must be 'tp:N'"):
    sharding.parse_mesh(spec)


def test_mesh_of_more_devices_than_exist():
  with pytest.raises(ValueError, match=r'mesh tp:2 needs 2 devices; 1 available'):
    sharding.make_mesh('tp:2', devices=jax.devices()[:1])
  assert sharding.make_mesh('auto', devices=jax.devices()[:1]).shape == {'tp': 1}
  assert sharding.make_mesh('') is None


@pytest.mark.parametrize('overrides,n,reason', [
    (dict(), 3, r'num_heads \(4\) must be divisible by the tensor-parallel size \(3\)'),
    (dict(num_heads=6, num_kv_heads=3), 2, r'num_kv_heads \(3\) and the tensor-parallel size'),
    (dict(num_heads=12, num_kv_heads=4), 6, r'num_kv_heads \(4\) and the tensor-parallel size'),
    (dict(intermediate_size=98), 4, r'intermediate_size \(98\) must be divisible'),
])
def test_models_that_do_not_split(overrides, n, reason):
  config = tiny.tiny_config(**overrides)
  with pytest.raises(ValueError, match=reason):
    sharding.check(config, _mesh(n))


def _stacked_specs(config, n):
  shapes = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  return sharding.tree_specs(shapes, config, n)


def _per_layer_specs(config, n):
  def build():
    params = model_lib.init_params(config, jax.random.key(0))
    return model_lib.unstack_layers(params, n, sharding.fuse_qkv(config, n))
  return sharding.tree_specs(jax.eval_shape(build), config, n)


def _cache_specs(config, n):
  cache = jax.eval_shape(lambda: init_cache(config, 256))
  return sharding.tree_specs(cache, config, n)


def test_rules_with_kv_heads_split():
  """tp = 2 over 2 KV heads: every head-like axis splits on 'tp'; a vocabulary of 97 does
  not split in two, so the embedding and the head are replicated."""
  config = tiny.tiny_config()  # H 4, KV 2, F 128, V 97, untied head
  specs = _stacked_specs(config, 2)
  layers = specs['layers']
  assert layers['wq'] == layers['wk'] == layers['wv'] == P(None, None, 'tp')
  assert layers['w_gate'] == layers['w_up'] == P(None, None, 'tp')
  assert layers['wo'] == layers['w_down'] == P(None, 'tp', None)
  assert layers['attn_norm'] == layers['mlp_norm'] == specs['final_norm'] == P()
  assert specs['embed'] == P(None, None) and specs['lm_head'] == P(None, None)
  fused = _per_layer_specs(config, 2)['layers'][3]
  assert set(fused) == {'attn_norm', 'w_qkv', 'wo', 'mlp_norm', 'w_gate_up', 'w_down'}
  assert fused['w_qkv'] == fused['w_gate_up'] == P(None, 'tp', None)
  assert fused['wo'] == fused['w_down'] == P('tp', None)
  cache = _cache_specs(config, 2)
  assert cache.k_LBSKh == cache.v_LBSKh == P(None, None, None, 'tp', None)
  assert cache.length == P()


def test_rules_with_more_devices_than_kv_heads():
  """tp = 4 over 2 KV heads: each KV head is held by the 2 devices whose query heads read it
  ('tp' of the [2, 2] view), query heads and the MLP split over all 4, q/k/v unfused."""
  config = tiny.tiny_config(vocab_size=128)
  specs = _stacked_specs(config, 4)
  layers = specs['layers']
  assert layers['wq'] == layers['w_gate'] == P(None, None, TP2)
  assert layers['wk'] == layers['wv'] == P(None, None, 'tp')
  assert layers['wo'] == layers['w_down'] == P(None, TP2, None)
  assert specs['embed'] == P(TP2, None) and specs['lm_head'] == P(None, TP2)
  fused = _per_layer_specs(config, 4)['layers'][0]
  assert 'w_qkv' not in fused and fused['wk'] == P(None, 'tp')
  assert fused['w_gate_up'] == P(None, TP2, None) and fused['wq'] == P(None, TP2)
  assert _cache_specs(config, 4).k_LBSKh == P(None, None, None, 'tp', None)


@pytest.mark.parametrize('n,kv_axis', [(8, 'tp'), (16, 'tp')])
def test_rules_of_llama3_70b(n, kv_axis):
  """8 KV heads: split over 8 devices; over 16, each held by a pair (the view's 'tp' has 8)."""
  config = models.llama3_70b()
  sharding.check(config, _mesh(n))
  every = 'tp' if n == 8 else TP2
  specs = _per_layer_specs(config, n)
  assert specs['embed'] == P(every, None) and specs['lm_head'] == P(None, every)
  assert specs['layers'][0]['w_gate_up'] == P(None, every, None)
  assert _cache_specs(config, n).k_LBSKh == P(None, None, None, kv_axis, None)


def test_fused_layout_holds_each_shards_own_heads():
  """Row i of the fused weight is [q_i k_i v_i]: the i-th n-th of wq's, wk's, wv's columns."""
  config = tiny.tiny_config()
  lp = jax.tree.map(lambda w: w[0], tiny.tiny_params(config)['layers'])
  fused = model_lib.fuse_projections(lp, num_shards=2)
  q, kv = 2 * config.head_dim, config.head_dim  # per shard: 2 query heads, 1 KV head
  w = fused['w_qkv']
  assert w.shape == (config.hidden_size, 2, q + 2 * kv)
  assert (w[:, 1, :q] == lp['wq'][:, q:]).all()
  assert (w[:, 1, q:q + kv] == lp['wk'][:, kv:]).all()
  assert (w[:, 0, q + kv:] == lp['wv'][:, :kv]).all()


def test_distributed_requested():
  assert not sharding.distributed_requested({})
  assert not sharding.distributed_requested({'SLURM_NTASKS': '1', 'TPU_WORKER_HOSTNAMES': 'a'})
  assert sharding.distributed_requested({'SLURM_NTASKS': '4'})
  assert sharding.distributed_requested({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'})
  assert sharding.distributed_requested({'TPU_WORKER_HOSTNAMES': 'a,b'})
  assert sharding.distributed_requested({'CLASP_JAX_DISTRIBUTED': '1'})
  assert not sharding.maybe_initialize_distributed({})


_CPU8 = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')


@pytest.mark.parametrize('mesh,reason', [
    ('tp:16', 'mesh tp:16 needs 16 devices; 8 available'),
    ('tp:2', 'num_heads (9) must be divisible by the tensor-parallel size (2)'),
    ('dp:2', "mesh must be 'tp:N'"),
])
def test_cli_rejects_a_bad_mesh_before_compiling(mesh, reason):
  result = subprocess.run(
      [sys.executable, '-m', 'clasp_jax.cli.generate', '--prompt=hi', f'--mesh={mesh}',
       '--cache_dir='], capture_output=True, text=True, timeout=300, check=False,
      env=dict(_CPU8, JAX_LOG_COMPILES='1'))
  assert result.returncode == 2, result.stderr
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith('error: ') and reason in last_line, result.stderr
  assert 'Compiling' not in result.stderr


@pytest.mark.slow
def test_sharded_runs_on_8_cpu_devices():
  """`multidevice_sharding.py` in a pytest process of its own, with 8 host devices."""
  result = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
       os.path.join(_HERE, 'multidevice_sharding.py')],
      capture_output=True, text=True, timeout=900, check=False, env=_CPU8, cwd=_HERE)
  assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
