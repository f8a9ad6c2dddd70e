"""Loading a Hugging Face LLaMA checkpoint folder (config.json + *.safetensors) into params.

Covers LLaMA 2, 3, 3.1 and 3.2 (and SmolLM-style models of the same architecture). Tensors are
read with `safetensors` through its flax backend, placed on the CPU, because its numpy backend
cannot represent bfloat16, the dtype most LLaMA checkpoints ship in. HF already uses the
rotate-half RoPE layout, so the only change is transposing (out, in) matrices to (in, out).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import glob
import json
import os
import re
from typing import Any

import jax
import numpy as np
import safetensors

from clasp_jax.config import LlamaConfig
from clasp_jax.config import RopeScaling
from clasp_jax.tokenizer import Tokenizer

# model.layers.N.<name> -> the key in params['layers'].
_LAYER_TENSORS = {
    'input_layernorm.weight': 'attn_norm',
    'self_attn.q_proj.weight': 'wq',
    'self_attn.k_proj.weight': 'wk',
    'self_attn.v_proj.weight': 'wv',
    'self_attn.o_proj.weight': 'wo',
    'post_attention_layernorm.weight': 'mlp_norm',
    'mlp.gate_proj.weight': 'w_gate',
    'mlp.up_proj.weight': 'w_up',
    'mlp.down_proj.weight': 'w_down',
}
_TOP_TENSORS = {'model.embed_tokens.weight': 'embed', 'model.norm.weight': 'final_norm',
                'lm_head.weight': 'lm_head'}
_LAYER_NAME = re.compile(r'model\.layers\.(\d+)\.(.+)')
# Buffers some older checkpoints saved; recomputed by the model.
_IGNORED_SUFFIX = '.rotary_emb.inv_freq'


def _read_config_json(folder: str) -> dict[str, Any]:
  """config.json as a dict."""
  try:
    with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'cannot read config.json: {e}') from e


def _rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
  """(rope_theta, LLaMA-3 scaling or None) from either transformers 4 or 5 config keys.

  transformers 4 writes `rope_theta` and `rope_scaling` (None for plain RoPE); transformers 5
  writes one `rope_parameters` dict holding both.
  """
  params = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  theta = float(params.get('rope_theta', hf.get('rope_theta', 10000.0)))
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if rope_type == 'default':
    return theta, None
  if rope_type != 'llama3':
    raise ValueError(f'rope_type {rope_type!r} is not supported (only default and llama3)')
  return theta, RopeScaling(
      factor=float(params['factor']),
      low_freq_factor=float(params['low_freq_factor']),
      high_freq_factor=float(params['high_freq_factor']),
      original_max_position_embeddings=int(params['original_max_position_embeddings']))


def _check_supported(hf: Mapping[str, Any]) -> None:
  """Raises ValueError unless config.json describes a LLaMA this library can run."""
  if hf.get('model_type') != 'llama':
    raise ValueError(f'model_type {hf.get("model_type")!r} is not supported (only llama)')
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ValueError(f'hidden_act {hf["hidden_act"]!r} is not supported (only silu)')
  # HF LLaMA's attention_bias also puts a bias on o_proj, which params has no slot for.
  if hf.get('mlp_bias') or hf.get('attention_bias'):
    raise ValueError('LLaMA checkpoints with mlp_bias or attention_bias are not supported')
  _rope(hf)  # Raises for RoPE types other than default and llama3.


def _config(hf: Mapping[str, Any], tokenizer: Tokenizer) -> LlamaConfig:
  """A LlamaConfig from a config.json dict; bos/eos ids come from the tokenizer."""
  theta, scaling = _rope(hf)
  try:
    heads = hf['num_attention_heads']
    return LlamaConfig(
        num_layers=hf['num_hidden_layers'],
        hidden_size=hf['hidden_size'],
        num_heads=heads,
        num_kv_heads=hf.get('num_key_value_heads') or heads,
        head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
        intermediate_size=hf['intermediate_size'],
        vocab_size=hf['vocab_size'],
        rms_norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
        max_position_embeddings=hf.get('max_position_embeddings', 2048),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=tokenizer.eos_token_ids,
    )
  except KeyError as e:
    raise ValueError(f'config.json lacks {e}') from e


def _safetensors_files(folder: str) -> list[str]:
  """The checkpoint's shards: those the index names, else every *.safetensors in the folder."""
  index = os.path.join(folder, 'model.safetensors.index.json')
  if os.path.isfile(index):
    with open(index, encoding='utf-8') as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    return [os.path.join(folder, s) for s in shards]
  return sorted(glob.glob(os.path.join(folder, '*.safetensors')))


def _tensors(files: list[str]) -> Iterator[tuple[str, np.ndarray]]:
  """(name, host array) for every tensor of the shards, bfloat16 included."""
  cpu = jax.local_devices(backend='cpu')[0]
  for path in files:
    try:
      with jax.default_device(cpu), safetensors.safe_open(path, framework='flax') as f:
        for name in f.keys():
          yield name, np.asarray(f.get_tensor(name))
    except (safetensors.SafetensorError, OSError) as e:
      raise ValueError(f'{path} is not a readable safetensors file: {e}') from e


def _params(files: list[str], config: LlamaConfig, dtype: np.dtype) -> dict[str, Any]:
  """The params pytree (host numpy arrays of `dtype`), matrices transposed to (in, out)."""
  params: dict[str, Any] = {}
  per_layer = {k: [None] * config.num_layers for k in _LAYER_TENSORS.values()}
  for name, w in _tensors(files):
    layer = _LAYER_NAME.fullmatch(name)
    if layer and layer[2] in _LAYER_TENSORS and int(layer[1]) < config.num_layers:
      key = _LAYER_TENSORS[layer[2]]
      per_layer[key][int(layer[1])] = (w.T if w.ndim == 2 else w).astype(dtype)
    elif name in _TOP_TENSORS:
      key = _TOP_TENSORS[name]
      params[key] = (w.T if key == 'lm_head' else w).astype(dtype)
    elif not name.endswith(_IGNORED_SUFFIX):
      raise ValueError(f'unexpected tensor {name!r} in a LLaMA checkpoint')
  if config.tie_embeddings:
    params.pop('lm_head', None)  # Some tied checkpoints store the copy anyway.
  for name, key in _TOP_TENSORS.items():
    if key not in params and not (key == 'lm_head' and config.tie_embeddings):
      raise ValueError(f'checkpoint lacks {name}')
  for name, key in _LAYER_TENSORS.items():
    missing = [i for i, w in enumerate(per_layer[key]) if w is None]
    if missing:
      raise ValueError(f'checkpoint lacks model.layers.{missing[0]}.{name}')
  if params['embed'].shape != (config.vocab_size, config.hidden_size):
    raise ValueError(f'embed_tokens has shape {params["embed"].shape}, config says '
                     f'({config.vocab_size}, {config.hidden_size})')
  params['layers'] = {k: np.stack(v) for k, v in per_layer.items()}  # [L, ...]
  return params


def load_hf(folder: str, dtype: np.dtype, check: Callable[[LlamaConfig], None] = lambda _: None
            ) -> tuple[LlamaConfig, dict[str, Any], Tokenizer]:
  """Loads a Hugging Face LLaMA folder.

  Args:
    folder: holds config.json, *.safetensors (optionally model.safetensors.index.json) and the
      tokenizer files (tokenizer.json).
    dtype: the dtype of every returned parameter.
    check: called with the config before any weight is read; what it raises stops the load.

  Returns:
    (config, params as host numpy arrays, tokenizer).

  Raises:
    ValueError: unsupported architecture or config, unreadable shards, missing or unexpected
      tensors, or no usable tokenizer.
  """
  try:
    hf = _read_config_json(folder)
    _check_supported(hf)
    files = _safetensors_files(folder)
    if not files:
      raise ValueError('no *.safetensors files')
    tokenizer = Tokenizer.from_hf(folder)
    config = _config(hf, tokenizer)
  except ValueError as e:
    raise ValueError(f'{folder}: {e}') from e
  check(config)  # the caller's objection, not the folder's: its own message
  try:
    return config, _params(files, config, np.dtype(dtype)), tokenizer
  except ValueError as e:
    raise ValueError(f'{folder}: {e}') from e
