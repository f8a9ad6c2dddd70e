"""Loading a llama.cpp GGUF file (LLaMA architecture) into the params pytree.

Every tensor is dequantised to float (`gguf.quants.dequantize`) and cast to the requested dtype:
the model runs unquantised. llama.cpp's converter permutes the rows of Q and K so its RoPE can
rotate adjacent pairs; this module undoes that, so the params use Hugging Face's rotate-half layout
and equal what transformers loads from the same file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import math
import mmap
import re
import struct
from typing import Any, NamedTuple

import gguf
import numpy as np

from clasp_jax.config import LlamaConfig
from clasp_jax.config import RopeScaling
from clasp_jax.tokenizer import Tokenizer

# blk.N.<name> in llama.cpp -> the key in params['layers'].
_LAYER_TENSORS = {
    'attn_norm.weight': 'attn_norm',
    'attn_q.weight': 'wq',
    'attn_k.weight': 'wk',
    'attn_v.weight': 'wv',
    'attn_output.weight': 'wo',
    'attn_q.bias': 'bq',
    'attn_k.bias': 'bk',
    'attn_v.bias': 'bv',
    'ffn_norm.weight': 'mlp_norm',
    'ffn_gate.weight': 'w_gate',
    'ffn_up.weight': 'w_up',
    'ffn_down.weight': 'w_down',
}
_TOP_TENSORS = {'token_embd.weight': 'embed', 'output_norm.weight': 'final_norm',
                'output.weight': 'lm_head'}
# Precomputed LLaMA-3 RoPE divisors; read into the config, not into params.
_ROPE_FREQS = 'rope_freqs.weight'
_BIAS_KEYS = ('bq', 'bk', 'bv')
_BLOCK_NAME = re.compile(r'blk\.(\d+)\.(.+)')
_V = gguf.GGUFValueType
# struct formats of the fixed-size metadata values (little-endian).
_SCALAR_FORMATS = {_V.UINT8: 'B', _V.INT8: 'b', _V.UINT16: 'H', _V.INT16: 'h', _V.UINT32: 'I',
                   _V.INT32: 'i', _V.FLOAT32: 'f', _V.BOOL: '?', _V.UINT64: 'Q', _V.INT64: 'q',
                   _V.FLOAT64: 'd'}
_VERSIONS = (2, 3)  # v1 counted in 32 bits; llama.cpp has written v3 since 2023


class GGUFTensor(NamedTuple):
  """One tensor of a GGUF file: its GGML type and its raw bytes [..., row bytes], a view of the
  memory-mapped file (read when dequantised)."""
  name: str
  tensor_type: gguf.GGMLQuantizationType
  data: np.ndarray


class _Cursor:
  """Reads a GGUF file's little-endian header fields from a memory map, in order."""

  def __init__(self, path: str, buffer: mmap.mmap):
    self.path, self.buffer, self.pos = path, buffer, 0

  def take(self, n: int) -> bytes:
    if self.pos + n > len(self.buffer):
      raise ValueError(f'{self.path} is a truncated or corrupt GGUF file (it ends inside its '
                       'header)')
    self.pos += n
    return self.buffer[self.pos - n:self.pos]

  def fields(self, fmt: str) -> tuple[Any, ...]:
    """One record of the struct format `fmt`."""
    return struct.unpack('<' + fmt, self.take(struct.calcsize('<' + fmt)))

  def array(self, item: str, count: int) -> list[Any]:
    """`count` values of the one-character struct format `item`."""
    return list(struct.unpack(f'<{count}{item}', self.take(count * struct.calcsize('<' + item))))

  def string(self) -> str:
    (length,) = self.fields('Q')
    try:
      return self.take(length).decode('utf-8')
    except UnicodeDecodeError as e:
      raise ValueError(f'{self.path} is a truncated or corrupt GGUF file ({e})') from e

  def value(self, value_type: int) -> Any:
    """One metadata value: a number, a str, or a list of either."""
    if value_type in _SCALAR_FORMATS:
      return self.fields(_SCALAR_FORMATS[value_type])[0]
    if value_type == _V.STRING:
      return self.string()
    if value_type == _V.ARRAY:
      item_type, count = self.fields('IQ')
      if item_type in _SCALAR_FORMATS:
        return self.array(_SCALAR_FORMATS[item_type], count)
      return [self.value(item_type) for _ in range(count)]
    raise ValueError(f'{self.path} is a truncated or corrupt GGUF file (metadata value type '
                     f'{value_type})')


def read_gguf(path: str) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
  """A GGUF file's key/value metadata (plain Python values) and its tensors by name.

  The header is parsed here rather than with `gguf.GGUFReader`, which takes seconds (about 5 s
  on 2 CPU cores for SmolLM2's 49,152-token vocabulary and its merges) building numpy views of
  every string; the tensors are still dequantised by `gguf.quants`.

  Raises:
    ValueError: the file is not GGUF (or is a big-endian or v1 one), or is truncated or corrupt.
  """
  with open(path, 'rb') as f:
    if f.read(4) != b'GGUF':
      raise ValueError(f'{path} is not a GGUF file (it does not start with the GGUF magic '
                       'bytes)')
    buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  header = _Cursor(path, buffer)
  header.take(4)
  (version,) = header.fields('I')
  if version not in _VERSIONS:
    raise ValueError(f'{path}: GGUF version {version} is not supported (little-endian '
                     f'v{" and v".join(map(str, _VERSIONS))} only)')
  num_tensors, num_values = header.fields('QQ')
  metadata = {}
  for _ in range(num_values):
    key = header.string()
    metadata[key] = header.value(header.fields('I')[0])
  table = []
  for _ in range(num_tensors):
    name = header.string()
    (num_dims,) = header.fields('I')
    dims = header.array('Q', num_dims)
    tensor_type, offset = header.fields('IQ')
    table.append((name, tuple(reversed(dims)), tensor_type, offset))  # numpy order
  alignment = metadata.get('general.alignment', gguf.GGUF_DEFAULT_ALIGNMENT)
  if not isinstance(alignment, int) or alignment < 1:
    raise ValueError(f'{path}: GGUF metadata general.alignment must be a positive integer, got '
                     f'{alignment!r}')
  data_start = -(-header.pos // alignment) * alignment
  tensors = {}
  for name, shape, tensor_type, offset in table:
    try:
      tensor_type = gguf.GGMLQuantizationType(tensor_type)
      byte_shape = gguf.quant_shape_to_byte_shape(shape, tensor_type)
    except (ValueError, KeyError) as e:
      raise ValueError(f'{path}: tensor {name} cannot be read ({e})') from e
    start, size = data_start + offset, math.prod(byte_shape)
    if start + size > len(buffer):
      raise ValueError(f'{path} is a truncated or corrupt GGUF file (tensor {name} ends past '
                       'its end)')
    data = np.frombuffer(buffer, np.uint8, count=size, offset=start).reshape(byte_shape)
    tensors[name] = GGUFTensor(name, tensor_type, data)
  return metadata, tensors


def load_tokenizer(path: str) -> Tokenizer:
  """The tokenizer a GGUF file's metadata describes (no tensor is read)."""
  return Tokenizer.from_gguf_metadata(read_gguf(path)[0])


def _int(metadata: Mapping[str, Any], key: str, default: int | None = None) -> int:
  """A required (or defaulted) positive integer metadata value (a count or a size)."""
  value = metadata.get(key, default)
  if value is None:
    raise ValueError(f'GGUF metadata lacks {key!r}')
  if not isinstance(value, int) or value < 1:
    raise ValueError(f'GGUF metadata {key!r} must be a positive integer, got {value!r}')
  return value


def reverse_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation: rows (head, i, half) -> (head, half, i).

  HF orders each head's rows as (half, i): the first half of the head dim, then the second,
  which rotate-half RoPE pairs up as (i, i + head_dim / 2). llama.cpp's converter `permute`
  swaps that to (i, half), so each rotated pair is adjacent (interleaved RoPE). This is the
  inverse, for a weight (out, in) or a bias (out,).
  """
  head_dim = w.shape[0] // n_heads
  return (w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _llama3_rope_divisors(scaling: RopeScaling, theta: float, head_dim: int) -> np.ndarray:
  """The per-frequency divisors llama.cpp's converter stores as `rope_freqs` for LLaMA 3."""
  freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  wavelen = 2 * math.pi / freqs
  old = scaling.original_max_position_embeddings
  smooth = (old / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  mid = 1 / ((1 - smooth) / scaling.factor + smooth)
  return np.where(wavelen < old / scaling.high_freq_factor, 1.0,
                  np.where(wavelen > old / scaling.low_freq_factor, scaling.factor, mid))


def _rope_scaling(metadata: Mapping[str, Any], rope_freqs: np.ndarray | None, theta: float,
                  head_dim: int) -> RopeScaling | None:
  """LLaMA-3 RoPE scaling, recovered from the `rope_freqs` tensor when the file has one.

  GGUF keeps no LLaMA-3 scaling parameters, only their result. The factor is the largest divisor;
  the other parameters are LLaMA 3.1/3.2's (low 1, high 4, original context 8192), checked
  against the stored divisors.
  """
  scaling_type = metadata.get('llama.rope.scaling.type', 'none')
  if scaling_type != 'none':
    raise ValueError(f'GGUF RoPE scaling type {scaling_type!r} is not supported')
  if rope_freqs is None:
    return None
  scaling = RopeScaling(factor=float(rope_freqs.max()))
  if not np.allclose(_llama3_rope_divisors(scaling, theta, head_dim), rope_freqs, rtol=1e-4):
    raise ValueError('GGUF rope_freqs do not match LLaMA-3 RoPE scaling with low_freq_factor 1, '
                     'high_freq_factor 4, original context 8192')
  return scaling


def _config(metadata: Mapping[str, Any], tensor_names: set[str], rope_freqs: np.ndarray | None,
            tokenizer: Tokenizer) -> LlamaConfig:
  """The LlamaConfig described by `llama.*` metadata and the tensors present."""
  hidden = _int(metadata, 'llama.embedding_length')
  heads = _int(metadata, 'llama.attention.head_count')
  head_dim = _int(metadata, 'llama.attention.key_length', hidden // heads)
  theta = float(metadata.get('llama.rope.freq_base', 10000.0))
  return LlamaConfig(
      num_layers=_int(metadata, 'llama.block_count'),
      hidden_size=hidden,
      num_heads=heads,
      num_kv_heads=_int(metadata, 'llama.attention.head_count_kv', heads),
      head_dim=head_dim,
      intermediate_size=_int(metadata, 'llama.feed_forward_length'),
      vocab_size=len(metadata['tokenizer.ggml.tokens']),
      rms_norm_eps=float(metadata.get('llama.attention.layer_norm_rms_epsilon', 1e-5)),
      rope_theta=theta,
      rope_scaling=_rope_scaling(metadata, rope_freqs, theta, head_dim),
      tie_embeddings='output.weight' not in tensor_names,
      attention_bias='blk.0.attn_q.bias' in tensor_names,
      max_position_embeddings=_int(metadata, 'llama.context_length', 2048),
      bos_token_id=tokenizer.bos_token_id,
      eos_token_ids=tokenizer.eos_token_ids,
  )


def _dequantize(tensor: GGUFTensor) -> np.ndarray:
  """A tensor as float32, in numpy (row-major, out-features first) order."""
  try:
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
  except NotImplementedError as e:
    raise ValueError(f'tensor {tensor.name} has GGML type {tensor.tensor_type.name}, '
                     'which gguf cannot dequantise') from e


def _convert(key: str, w: np.ndarray, config: LlamaConfig) -> np.ndarray:
  """One llama.cpp tensor in the params layout: HF rotate-half Q/K rows, matrices (in, out)."""
  if key in ('wq', 'bq'):
    w = reverse_permute(w, config.num_heads)
  elif key in ('wk', 'bk'):
    w = reverse_permute(w, config.num_kv_heads)
  return w.T if w.ndim == 2 and key != 'embed' else w


def _params(tensors: Mapping[str, GGUFTensor], config: LlamaConfig,
            dtype: np.dtype) -> dict[str, Any]:
  """The params pytree (host numpy arrays of `dtype`) from the file's tensors."""
  params: dict[str, Any] = {}
  per_layer: dict[str, list[np.ndarray | None]] = {}
  for name, tensor in tensors.items():
    if name == _ROPE_FREQS:
      continue
    block = _BLOCK_NAME.fullmatch(name)
    if block and block[2] in _LAYER_TENSORS and int(block[1]) < config.num_layers:
      key = _LAYER_TENSORS[block[2]]
      w = _convert(key, _dequantize(tensor), config).astype(dtype)
      per_layer.setdefault(key, [None] * config.num_layers)[int(block[1])] = w
    elif name in _TOP_TENSORS:
      key = _TOP_TENSORS[name]
      params[key] = _convert(key, _dequantize(tensor), config).astype(dtype)
    else:
      raise ValueError(f'unexpected tensor {name!r} in a LLaMA GGUF file')
  expected = {name: key for name, key in _LAYER_TENSORS.items()
              if config.attention_bias or key not in _BIAS_KEYS}
  for name, key in expected.items():
    missing = [i for i, w in enumerate(per_layer.get(key, [None])) if w is None]
    if missing:
      raise ValueError(f'GGUF file lacks blk.{missing[0]}.{name}')
  for name in ('token_embd.weight', 'output_norm.weight'):
    if _TOP_TENSORS[name] not in params:
      raise ValueError(f'GGUF file lacks {name}')
  if params['embed'].shape[0] != config.vocab_size:
    raise ValueError(f'token_embd has {params["embed"].shape[0]} rows but the vocabulary has '
                     f'{config.vocab_size} tokens')
  params['layers'] = {k: np.stack(per_layer[k]) for k in expected.values()}  # [L, ...]
  return params


def load_gguf(path: str, dtype: np.dtype, check: Callable[[LlamaConfig], None] = lambda _: None
              ) -> tuple[LlamaConfig, dict[str, Any], Tokenizer]:
  """Loads a LLaMA-architecture GGUF file.

  Args:
    path: the .gguf file.
    dtype: the dtype of every returned parameter.
    check: called with the config before any tensor is dequantised; what it raises stops the
      load (a mesh the model cannot be split over, say, before minutes of converting).

  Returns:
    (config, params as host numpy arrays, tokenizer).

  Raises:
    ValueError: the file is not a whole GGUF file, is not LLaMA, or lacks or has unexpected
      tensors or metadata.
  """
  metadata, tensors = read_gguf(path)
  try:
    architecture = metadata.get('general.architecture')
    if architecture != 'llama':
      raise ValueError(f'GGUF architecture {architecture!r} is not supported (only llama)')
    rope_freqs = _dequantize(tensors[_ROPE_FREQS]) if _ROPE_FREQS in tensors else None
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    config = _config(metadata, set(tensors), rope_freqs, tokenizer)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e
  check(config)  # the caller's objection, not the file's: its own message
  try:
    return config, _params(tensors, config, np.dtype(dtype)), tokenizer
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e
