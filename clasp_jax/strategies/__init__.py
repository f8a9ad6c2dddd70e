"""Decoding strategies, each a small frozen dataclass beside the others.

`build` turns the CLI's flat settings into a strategy for a given model.
"""

from __future__ import annotations

from clasp_jax.config import LlamaConfig
from clasp_jax.strategies.base import Drafts, Strategy
from clasp_jax.strategies.clasp import Clasp, clasp_dp
from clasp_jax.strategies.pld import PromptLookup
from clasp_jax.strategies.static import StaticSkip
from clasp_jax.strategies.vanilla import Vanilla

METHODS = ('vanilla', 'clasp', 'static', 'pld')

# Defaults measured on SmolLM2-135M (docs/results/): see README "Choosing M, K, DET, LOI".
DEFAULT_NUM_DRAFT_TOKENS = 8
DEFAULT_DRAFT_EXIT_THRESHOLD = 0.7
DEFAULT_LOI = 1
DEFAULT_SKIP_RATIO = 0.1


def num_skip_for(config: LlamaConfig, skip_layers: int | None, skip_ratio: float | None) -> int:
  """M from an explicit count or a ratio of L (rounded), validated against the model."""
  if skip_layers is not None and skip_ratio is not None:
    raise ValueError('give skip_layers or skip_ratio, not both')
  L = config.num_layers
  if skip_layers is None:
    ratio = DEFAULT_SKIP_RATIO if skip_ratio is None else skip_ratio
    if not 0 <= ratio < 1:
      raise ValueError(f'skip_ratio must be in [0, 1), got {ratio}')
    skip_layers = round(ratio * L)
  if not 0 <= skip_layers < L:
    raise ValueError(f'skip_layers (M) must be in [0, L) = [0, {L}), got {skip_layers}')
  return skip_layers


def evenly_spaced_skip_set(config: LlamaConfig, num_skip: int) -> tuple[int, ...]:
  """A static skip set of M layers spread evenly, never the first or last layer."""
  inner = range(1, config.num_layers - 1)
  if num_skip > len(inner):
    raise ValueError(f'cannot spread {num_skip} skipped layers over {len(inner)} inner layers')
  step = len(inner) / max(num_skip, 1)
  return tuple(inner[int(i * step + step / 2)] for i in range(num_skip))


def build(method: str, config: LlamaConfig, *, skip_layers: int | None = None,
          skip_ratio: float | None = None, skip_set: tuple[int, ...] | None = None,
          num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
          draft_exit_threshold: float = DEFAULT_DRAFT_EXIT_THRESHOLD,
          loi: int = DEFAULT_LOI) -> Strategy:
  """The strategy `method` with the given settings, validated against `config`.

  Raises:
    ValueError: for an unknown method or settings that do not fit the model.
  """
  if method == 'vanilla':
    strategy = Vanilla()
  elif method == 'clasp':
    if skip_set is not None:
      raise ValueError('--skip_set fixes the skip set: use it with method static, not clasp')
    strategy = Clasp(num_skip=num_skip_for(config, skip_layers, skip_ratio),
                     num_draft_tokens=num_draft_tokens,
                     draft_exit_threshold=draft_exit_threshold, loi=loi)
  elif method == 'static':
    if skip_set is None:
      skip_set = evenly_spaced_skip_set(config, num_skip_for(config, skip_layers, skip_ratio))
    strategy = StaticSkip(skip_layers=tuple(skip_set), num_draft_tokens=num_draft_tokens,
                          draft_exit_threshold=draft_exit_threshold)
  elif method == 'pld':
    strategy = PromptLookup(num_draft_tokens=num_draft_tokens)
  else:
    raise ValueError(f'unknown method {method!r}; choose from {", ".join(METHODS)}')
  strategy.validate(config)
  return strategy


__all__ = ['METHODS', 'Clasp', 'Drafts', 'PromptLookup', 'StaticSkip', 'Strategy', 'Vanilla',
           'build', 'clasp_dp', 'evenly_spaced_skip_set', 'num_skip_for']
