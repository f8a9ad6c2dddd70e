"""Model configuration: the shape and numerics of a LLaMA-family decoder.

The model presets (SmolLM2-135M, LLaMA-3.2-1B, LLaMA-3-8B, LLaMA-3-70B shapes) live in
`configs/models.py` (importable as `clasp_jax.configs.models`); loaders build a
`LlamaConfig` from a checkpoint's own metadata.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """LLaMA-3 ("llama3" rope_type) frequency scaling, as in HF transformers."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of a LLaMA decoder.

  Attributes:
    num_layers: L, the number of decoder layers.
    hidden_size: D, the residual width.
    num_heads: H, query heads.
    num_kv_heads: KV heads (GQA when smaller than `num_heads`).
    head_dim: per-head width (usually D / H).
    intermediate_size: F, the MLP width.
    vocab_size: V.
    rms_norm_eps: epsilon of every RMSNorm.
    rope_theta: RoPE base frequency.
    rope_scaling: LLaMA-3 RoPE scaling, or None for plain RoPE.
    tie_embeddings: whether the LM head reuses the embedding matrix.
    attention_bias: whether q/k/v projections carry a bias (Qwen-style variants).
    max_position_embeddings: the longest context the model supports.
    bos_token_id: beginning-of-sequence id, or None.
    eos_token_ids: ids that end a generation.
  """

  num_layers: int
  hidden_size: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  vocab_size: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  tie_embeddings: bool = False
  attention_bias: bool = False
  max_position_embeddings: int = 2048
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    for name in ('num_layers', 'hidden_size', 'num_heads', 'num_kv_heads', 'head_dim',
                 'intermediate_size', 'vocab_size', 'max_position_embeddings'):
      if getattr(self, name) < 1:
        raise ValueError(f'LlamaConfig.{name} must be >= 1, got {getattr(self, name)}')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads ({self.num_heads}) must be a multiple of num_kv_heads '
                       f'({self.num_kv_heads})')

  @property
  def num_params(self) -> int:
    """Parameter count (embedding counted once when tied)."""
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    per_layer = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
    if self.attention_bias:
      per_layer += q + 2 * kv
    head = 0 if self.tie_embeddings else d * v
    return v * d + self.num_layers * per_layer + d + head
