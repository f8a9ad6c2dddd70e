"""Tiny random models shared by the tests (no checkpoint on disk)."""

import jax
import numpy as np

from clasp_jax import model as model_lib
from clasp_jax.config import LlamaConfig, RopeScaling
from clasp_jax.strategies import adaptive


def tiny_config(**overrides) -> LlamaConfig:
  """A 6-layer GQA model with LLaMA-3 RoPE scaling and a 97-token vocabulary."""
  settings = dict(num_layers=6, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                  intermediate_size=128, vocab_size=97, max_position_embeddings=512,
                  rope_theta=10000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64),
                  eos_token_ids=(3,))
  settings.update(overrides)
  return LlamaConfig(**settings)


def tiny_params(config: LlamaConfig, seed: int = 0, scale: float = 0.2):
  """Random params whose layers matter (scale 0.2 keeps skipping a layer visible)."""
  return model_lib.init_params(config, jax.random.key(seed), scale=scale)


#: New tokens per generation in the losslessness tests on tiny models.
MAX_NEW = 40


def prompts(config: LlamaConfig, count: int = 3, length: int = 20) -> list[list[int]]:
  """Random prompts (the same ones every call), avoiding the low ids EOS lives among."""
  rng = np.random.RandomState(1)
  return [rng.randint(4, config.vocab_size, length).tolist() for _ in range(count)]


def gpu_like_costs(num_layers: int) -> adaptive.Costs:
  """Step costs of a device where drafting pays: a draft step costs its share of the layers,
  a verify pass one plain step."""
  return adaptive.Costs(full_step=1.0, draft_base=0.05, draft_per_layer=0.9 / num_layers,
                        verify=1.0, dp=0.3)


def set_costs(decoder, costs: adaptive.Costs | None = None) -> None:
  """Has `auto` on `decoder` choose M by `costs` (default: `gpu_like_costs`) instead of
  measuring them: on this CPU a verify pass costs several plain steps, so measured costs would
  have it decode plainly (and measuring runs segments of its own)."""
  num_layers = decoder.config.num_layers
  decoder.adaptive_policy = adaptive.AdaptivePolicy(
      decoder.strategy, num_layers, costs or gpu_like_costs(num_layers))

#: ConfLayers settings whose confidence search moves within one short generation (the
#: `conflayers_settings` of `strategies.build`).
QUICK_CONFLAYERS = dict(eval_rounds=4, early_rounds=2, window=16)
