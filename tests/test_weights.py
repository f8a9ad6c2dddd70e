"""Tests of clasp_jax.weights: HF and GGUF loading against transformers, the cache, and errors."""

import json
import logging
import math
import os
import re
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from clasp_jax import sharding
from clasp_jax import strategies
from clasp_jax import weights
from clasp_jax.config import LlamaConfig
from clasp_jax.config import RopeScaling
from clasp_jax.engine import Decoder
from clasp_jax.weights import gguf as gguf_weights
from clasp_jax.weights import hf
from clasp_jax.weights import store

_HF_LAYER_NAMES = {
    'attn_norm': 'input_layernorm.weight', 'wq': 'self_attn.q_proj.weight',
    'wk': 'self_attn.k_proj.weight', 'wv': 'self_attn.v_proj.weight',
    'wo': 'self_attn.o_proj.weight', 'mlp_norm': 'post_attention_layernorm.weight',
    'w_gate': 'mlp.gate_proj.weight', 'w_up': 'mlp.up_proj.weight',
    'w_down': 'mlp.down_proj.weight',
}


def _expected_params(state_dict: dict[str, np.ndarray], num_layers: int) -> dict:
  """The params tree a HF state dict should load as: layers stacked, matrices (in, out)."""

  def t(w):
    return w.T if w.ndim == 2 else w

  expected = {
      'embed': state_dict['model.embed_tokens.weight'],
      'final_norm': state_dict['model.norm.weight'],
      'layers': {k: np.stack([t(state_dict[f'model.layers.{i}.{name}'])
                              for i in range(num_layers)])
                 for k, name in _HF_LAYER_NAMES.items()},
  }
  if 'lm_head.weight' in state_dict:
    expected['lm_head'] = state_dict['lm_head.weight'].T
  return expected


def _assert_trees_close(actual, expected, atol):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), atol=atol,
                               rtol=0, err_msg=jax.tree_util.keystr(path))


def test_hf_folder_matches_torch_state_dict(tiny_hf_checkpoint):
  model = weights.load(tiny_hf_checkpoint, dtype='float32', per_layer=False)  # stacked
  torch_model = transformers.LlamaForCausalLM.from_pretrained(tiny_hf_checkpoint)
  state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}

  _assert_trees_close(model.params, _expected_params(state_dict, 4), atol=0)
  assert model.config == LlamaConfig(
      num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
      intermediate_size=128, vocab_size=256, rms_norm_eps=1e-6, rope_theta=10000.0,
      rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32), tie_embeddings=False,
      max_position_embeddings=256, bos_token_id=1, eos_token_ids=(2,))
  assert model.source == os.path.abspath(tiny_hf_checkpoint)


def test_hf_folder_in_bfloat16(write_tiny_hf_checkpoint, tmp_path):
  """A tied bfloat16 checkpoint (LLaMA 3.2's dtype) loads, into a float32 tree if asked."""
  folder = write_tiny_hf_checkpoint(str(tmp_path / 'bf16'), torch.bfloat16,
                                    tie_word_embeddings=True)
  bf16 = weights.load(folder, dtype=jnp.bfloat16)
  f32 = weights.load(folder, dtype=jnp.float32)

  assert bf16.config.tie_embeddings and 'lm_head' not in bf16.params
  assert {x.dtype for x in jax.tree.leaves(bf16.params)} == {jnp.dtype(jnp.bfloat16)}
  _assert_trees_close(f32.params, bf16.params, atol=0)


def test_hf_config_from_transformers_4_keys():
  """transformers 4 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters."""
  theta, scaling = hf._rope({'rope_theta': 500000.0, 'rope_scaling': {
      'rope_type': 'llama3', 'factor': 32.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
      'original_max_position_embeddings': 8192}})

  assert (theta, scaling) == (500000.0, RopeScaling(32.0, 1.0, 4.0, 8192))
  assert hf._rope({'rope_theta': 10000.0, 'rope_scaling': None}) == (10000.0, None)


def test_embedded_gguf_config(smollm2):
  config = smollm2.config

  assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
          config.head_dim, config.intermediate_size, config.vocab_size) == (
              30, 576, 9, 3, 64, 1536, 49152)
  assert config.tie_embeddings and 'lm_head' not in smollm2.params
  assert config.rope_theta == 100000.0 and config.rope_scaling is None
  assert config.max_position_embeddings == 8192
  assert config.bos_token_id == 1 and 2 in config.eos_token_ids  # <|im_start|>, <|im_end|>
  assert smollm2.params['layers']['wq'].shape == (30, 576, 576)
  assert smollm2.params['layers']['wk'].shape == (30, 576, 192)


def test_embedded_gguf_matches_transformers(smollm2, smollm2_path):
  """Dequantised, un-permuted params equal what transformers' GGUF loader produces."""
  config = transformers.LlamaConfig(
      vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
  with torch.device('meta'):
    skeleton = transformers.LlamaForCausalLM(config)
  # The loader under from_pretrained(folder, gguf_file=name); calling it directly avoids
  # from_pretrained's dependency on accelerate.
  parsed = load_gguf_checkpoint(smollm2_path, return_tensors=True, model_to_load=skeleton)
  state_dict = {k: v.numpy() for k, v in parsed['tensors'].items()}

  _assert_trees_close(smollm2.params, _expected_params(state_dict, 30), atol=1e-6)


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py's Q/K permutation (HF rotate-half -> interleaved)."""
  return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _llama_cpp_rope_freqs(theta, head_dim, factor, low, high, old_context):
  """llama.cpp convert_hf_to_gguf.py's LLaMA-3 `rope_freqs` tensor."""
  result = []
  for freq in 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)):
    wavelen = 2 * math.pi / freq
    if wavelen < old_context / high:
      result.append(1.0)
    elif wavelen > old_context / low:
      result.append(factor)
    else:
      smooth = (old_context / wavelen - low) / (high - low)
      result.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(result, np.float32)


def _write_tiny_gguf(path, state_dict, tokens, biases, rope_freqs):
  """A float32 GGUF of the tiny model, written as llama.cpp's converter would."""
  writer = gguf.GGUFWriter(path, 'llama')
  writer.add_block_count(4)
  writer.add_context_length(256)
  writer.add_embedding_length(64)
  writer.add_feed_forward_length(128)
  writer.add_head_count(4)
  writer.add_head_count_kv(2)
  writer.add_rope_freq_base(500000.0)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_tokenizer_model('gpt2')
  writer.add_token_list(tokens)
  writer.add_token_types([3] * 3 + [1] * 253)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_tensor('token_embd.weight', state_dict['model.embed_tokens.weight'])
  writer.add_tensor('output_norm.weight', state_dict['model.norm.weight'])
  writer.add_tensor('output.weight', state_dict['lm_head.weight'])
  writer.add_tensor('rope_freqs.weight', rope_freqs)
  gguf_names = {'attn_norm': 'attn_norm', 'wq': 'attn_q', 'wk': 'attn_k', 'wv': 'attn_v',
                'wo': 'attn_output', 'mlp_norm': 'ffn_norm', 'w_gate': 'ffn_gate',
                'w_up': 'ffn_up', 'w_down': 'ffn_down'}
  for i in range(4):
    for key, hf_name in _HF_LAYER_NAMES.items():
      w = state_dict[f'model.layers.{i}.{hf_name}']
      w = {'wq': lambda x: _llama_cpp_permute(x, 4),
           'wk': lambda x: _llama_cpp_permute(x, 2)}.get(key, lambda x: x)(w)
      writer.add_tensor(f'blk.{i}.{gguf_names[key]}.weight', w)
    writer.add_tensor(f'blk.{i}.attn_q.bias', _llama_cpp_permute(biases['bq'][i], 4))
    writer.add_tensor(f'blk.{i}.attn_k.bias', _llama_cpp_permute(biases['bk'][i], 2))
    writer.add_tensor(f'blk.{i}.attn_v.bias', biases['bv'][i])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_gguf_unpermutes_qk_and_reads_biases_and_llama3_rope(tiny_hf_checkpoint, tmp_path):
  """A GGUF written with llama.cpp's permutation loads back to the HF weights."""
  state_dict = safetensors.numpy.load_file(
      os.path.join(tiny_hf_checkpoint, 'model.safetensors'))
  rng = np.random.default_rng(0)
  biases = {'bq': rng.normal(size=(4, 64)), 'bk': rng.normal(size=(4, 32)),
            'bv': rng.normal(size=(4, 32))}
  biases = {k: v.astype(np.float32) for k, v in biases.items()}
  rope_freqs = _llama_cpp_rope_freqs(500000.0, 16, 32.0, 1.0, 4.0, 8192)
  tokens = transformers.PreTrainedTokenizerFast.from_pretrained(
      tiny_hf_checkpoint).convert_ids_to_tokens(list(range(256)))
  path = str(tmp_path / 'tiny.gguf')
  _write_tiny_gguf(path, state_dict, tokens, biases, rope_freqs)

  model = weights.load(path, dtype='float32', per_layer=False)  # stacked, as expected

  expected = _expected_params(state_dict, 4)
  expected['layers'].update(biases)
  _assert_trees_close(model.params, expected, atol=0)
  assert model.config.attention_bias and not model.config.tie_embeddings
  assert model.config.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
  assert model.config.rope_theta == 500000.0


def test_store_round_trip(tiny_hf_checkpoint, tmp_path, monkeypatch):
  cache_dir = str(tmp_path / 'cache')
  first = weights.load(tiny_hf_checkpoint, dtype='float32', cache_dir=cache_dir)

  def fail(*unused_args):
    raise AssertionError('the second load must come from the cache')

  monkeypatch.setattr(hf, 'load_hf', fail)
  second = weights.load(tiny_hf_checkpoint, dtype='float32', cache_dir=cache_dir)

  assert len(os.listdir(cache_dir)) == 1
  assert second.config == first.config
  _assert_trees_close(second.params, first.params, atol=0)
  assert isinstance(second.params['embed'], jax.Array)
  text = 'héllo, wörld'
  assert second.tokenizer.encode(text) == first.tokenizer.encode(text)
  assert second.tokenizer.eos_token_ids == first.tokenizer.eos_token_ids


def test_store_key_changes_with_source_and_dtype(tiny_hf_checkpoint, tmp_path):
  folder = shutil.copytree(tiny_hf_checkpoint, tmp_path / 'copy')
  key = store.cache_key(str(folder), np.float32)

  assert store.cache_key(str(folder), np.float32) == key
  assert store.cache_key(str(folder), jnp.bfloat16) != key
  os.utime(folder / 'model.safetensors', ns=(0, 0))
  assert store.cache_key(str(folder), np.float32) != key


def test_store_reuses_entry_without_calling_loader(tiny_hf_checkpoint, tmp_path):
  calls = []

  def loader():
    calls.append(1)
    return hf.load_hf(tiny_hf_checkpoint, np.dtype(np.float32))

  for _ in range(2):
    config, _, _ = store.cached_load(tiny_hf_checkpoint, loader, str(tmp_path), np.float32)

  assert len(calls) == 1 and config.num_layers == 4


def test_store_removes_entries_no_load_can_reach(tiny_hf_checkpoint, tmp_path):
  """A new entry removes those of the same source name whose source is gone (a deleted
  virtualenv's packaged model) or changed in place; entries of sources still there stay."""
  cache_dir = tmp_path / 'cache'
  copies = {n: shutil.copytree(tiny_hf_checkpoint, tmp_path / n / 'model') for n in 'abc'}
  load = lambda folder: store.cached_load(
      str(folder), lambda: hf.load_hf(str(folder), np.dtype(np.float32)), str(cache_dir),
      np.float32)
  for folder in copies.values():
    load(folder)
  assert len(os.listdir(cache_dir)) == 3
  shutil.rmtree(tmp_path / 'a')  # gone
  os.utime(copies['b'] / 'model.safetensors', ns=(0, 0))  # changed in place
  load(copies['b'])
  assert sorted(os.listdir(cache_dir)) == sorted(
      store.cache_key(str(copies[n]), np.float32) for n in 'bc')


def test_missing_path():
  with pytest.raises(ValueError, match='no such file or directory'):
    weights.load('/nonexistent/model.gguf')


def test_gguf_header_reads_as_the_gguf_librarys_reader_does(tmp_path):
  """`read_gguf` (our header parser) against `gguf.GGUFReader` on a file holding every kind of
  metadata value and float and quantised tensors: the same values, the same dequantised
  tensors."""
  path = str(tmp_path / 'kinds.gguf')
  writer = gguf.GGUFWriter(path, 'llama')
  V = gguf.GGUFValueType
  rng = np.random.default_rng(0)
  for kind, value in [(V.UINT8, 7), (V.INT8, -7), (V.UINT16, 700), (V.INT16, -700),
                      (V.UINT32, 70000), (V.INT32, -70000), (V.FLOAT32, 0.25), (V.BOOL, True),
                      (V.UINT64, 2**40), (V.INT64, -2**40), (V.FLOAT64, 1e-300),
                      (V.STRING, 'héllo ✓')]:
    writer.add_key_value(f'kinds.{kind.name.lower()}', value, kind)
  writer.add_array('kinds.strings', ['a', '', 'Ġb c', '✓'])
  writer.add_array('kinds.ints', [3, -1, 4])
  writer.add_array('kinds.floats', [0.5, -2.0])
  writer.add_tensor('f32', rng.normal(size=(3, 8)).astype(np.float32))
  writer.add_tensor('f16', rng.normal(size=(2, 4)).astype(np.float16))
  for qtype in (gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0):
    w = rng.normal(size=(2, 64)).astype(np.float32)
    writer.add_tensor(qtype.name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()

  metadata, tensors = gguf_weights.read_gguf(path)
  reader = gguf.GGUFReader(path)
  expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith('GGUF.')}
  assert metadata == expected and metadata['kinds.string'] == 'héllo ✓'
  assert list(tensors) == [t.name for t in reader.tensors] == ['f32', 'f16', 'Q4_1', 'Q8_0']
  for t in reader.tensors:
    np.testing.assert_array_equal(gguf_weights._dequantize(tensors[t.name]),
                                  gguf.quants.dequantize(t.data, t.tensor_type), err_msg=t.name)


def test_a_config_is_checked_before_any_weight_is_read(tiny_hf_checkpoint, smollm2_path,
                                                       tmp_path, monkeypatch):
  """The loaders' `check` (`weights.load` passes the mesh's) sees the config before a weight
  is read: from a Hugging Face folder, a GGUF file and a cache entry, what it raises stops the
  load."""
  cache_dir = str(tmp_path / 'cache')
  weights.load(tiny_hf_checkpoint, dtype='float32', cache_dir=cache_dir)  # the cache entry

  def never(*unused_args):
    raise AssertionError('a weight was read')

  def stop(config):
    raise ValueError(f'stopped at a config of {config.num_layers} layers')

  monkeypatch.setattr(hf, '_params', never)
  monkeypatch.setattr(gguf_weights, '_params', never)
  monkeypatch.setattr(store.ocp, 'StandardCheckpointer', never)
  for load in (lambda: hf.load_hf(tiny_hf_checkpoint, np.float32, stop),
               lambda: gguf_weights.load_gguf(smollm2_path, np.float32, stop),
               lambda: store.cached_load(tiny_hf_checkpoint, never, cache_dir, np.float32,
                                         stop)):
    with pytest.raises(ValueError, match='stopped at a config of'):
      load()


def test_text_file_named_gguf(tmp_path):
  path = tmp_path / 'x.gguf'
  path.write_text('not a model\n')
  with pytest.raises(ValueError, match='not a GGUF file'):
    weights.load(str(path))


def test_truncated_gguf(smollm2_path, tmp_path):
  path = tmp_path / 'truncated.gguf'
  with open(smollm2_path, 'rb') as f:
    path.write_bytes(f.read(1 << 20))
  with pytest.raises(ValueError, match='truncated or corrupt'):
    weights.load(str(path))


def test_gguf_unsupported_architecture(tmp_path):
  path = str(tmp_path / 'gpt2.gguf')
  writer = gguf.GGUFWriter(path, 'gpt2')
  writer.add_block_count(1)
  writer.add_tensor('token_embd.weight', np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
    weights.load(path)


def _folder_with_config(folder, config):
  os.makedirs(folder)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f)
  safetensors.numpy.save_file({'x': np.zeros(2, np.float32)},
                              os.path.join(folder, 'model.safetensors'))
  return str(folder)


def test_hf_unsupported_architecture(tmp_path):
  folder = _folder_with_config(tmp_path / 'gpt2', {'model_type': 'gpt2', 'n_layer': 2})
  with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
    weights.load(folder)


def test_hf_unsupported_rope_type(tiny_hf_checkpoint, tmp_path):
  with open(os.path.join(tiny_hf_checkpoint, 'config.json')) as f:
    config = json.load(f)
  config['rope_parameters'] = {'rope_type': 'yarn', 'factor': 4.0, 'rope_theta': 1e4}
  folder = _folder_with_config(tmp_path / 'yarn', config)
  with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
    weights.load(folder)


def test_truncated_safetensors(tiny_hf_checkpoint, tmp_path):
  folder = shutil.copytree(tiny_hf_checkpoint, tmp_path / 'truncated')
  shard = folder / 'model.safetensors'
  shard.write_bytes(shard.read_bytes()[:1000])
  with pytest.raises(ValueError, match='not a readable safetensors file'):
    weights.load(str(folder))


def test_folder_without_checkpoint(tmp_path):
  with pytest.raises(ValueError, match='expected a .gguf file or a Hugging Face folder'):
    weights.load(str(tmp_path))


def test_hf_missing_tensor(tiny_hf_checkpoint, tmp_path):
  folder = shutil.copytree(tiny_hf_checkpoint, tmp_path / 'missing')
  shard = str(folder / 'model.safetensors')
  tensors = safetensors.numpy.load_file(shard)
  del tensors['model.layers.3.mlp.up_proj.weight']
  safetensors.numpy.save_file(tensors, shard)
  with pytest.raises(ValueError, match=r'lacks model\.layers\.3\.mlp\.up_proj\.weight'):
    weights.load(str(folder))


def test_a_loaded_model_reaches_its_first_token_through_three_programs(tiny_hf_checkpoint,
                                                                     tmp_path, caplog):
  """What a new process compiles, or loads from the persistent cache, between loading a cached
  model and its first token: the layer fusion of the accelerator layout, the empty cache and
  the prefill. No program per weight array nor for the sampling key: on a GPU each is one more
  executable to load before the first token."""
  cache_dir = str(tmp_path / 'cache')
  weights.load(tiny_hf_checkpoint, dtype='float32', cache_dir=cache_dir)  # converts
  jax.clear_caches()
  sharding.cache_program.cache_clear()  # kept per process: an earlier test may have made it
  caplog.set_level(logging.WARNING)
  with jax.log_compiles(True):
    model = weights.load(tiny_hf_checkpoint, dtype='float32', cache_dir=cache_dir,
                         per_layer=True)
    decoder = Decoder(model.params, model.config, strategies.Vanilla(), fast_path=True,
                      attention='xla')
    decoder.start([5, 6, 7], 4, seed=3)
  compiled = [m.group(1) for r in caplog.records
              if (m := re.match(r'Compiling jit\((\w+)\)', r.getMessage()))]
  assert compiled == ['fuse_projections', 'init_cache', '_prefill']
