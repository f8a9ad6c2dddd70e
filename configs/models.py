"""Shapes of well-known LLaMA-family models, as `LlamaConfig`s.

For benchmarks and memory estimates of a model's shape with random weights
(`clasp_jax.model.init_params`); a real checkpoint's config comes from its own metadata. The
numbers are those of each model's public Hugging Face `config.json`. Token ids are left unset:
with no EOS, a random-weight benchmark always runs to its token budget.
"""

from __future__ import annotations

from collections.abc import Callable

from clasp_jax.config import LlamaConfig, RopeScaling


def smollm2_135m() -> LlamaConfig:
  """HuggingFaceTB/SmolLM2-135M(-Instruct)."""
  return LlamaConfig(
      num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
      intermediate_size=1536, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
      tie_embeddings=True, max_position_embeddings=8192)


def llama3_2_1b() -> LlamaConfig:
  """meta-llama/Llama-3.2-1B(-Instruct)."""
  return LlamaConfig(
      num_layers=16, hidden_size=2048, num_heads=32, num_kv_heads=8, head_dim=64,
      intermediate_size=8192, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
      rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=8192),
      tie_embeddings=True, max_position_embeddings=131072)


def llama3_8b() -> LlamaConfig:
  """meta-llama/Meta-Llama-3-8B(-Instruct)."""
  return LlamaConfig(
      num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
      intermediate_size=14336, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
      tie_embeddings=False, max_position_embeddings=8192)


def llama3_70b() -> LlamaConfig:
  """meta-llama/Meta-Llama-3-70B(-Instruct)."""
  return LlamaConfig(
      num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8, head_dim=128,
      intermediate_size=28672, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
      tie_embeddings=False, max_position_embeddings=8192)


PRESETS: dict[str, Callable[[], LlamaConfig]] = {
    'smollm2-135m': smollm2_135m,
    'llama3.2-1b': llama3_2_1b,
    'llama3-8b': llama3_8b,
    'llama3-70b': llama3_70b,
}
