"""A fixed skip set chosen up front: the decoding side of Self-SD (Zhang et al., 2024)."""

from __future__ import annotations

import dataclasses

from clasp_jax.strategies import layer_skip
from clasp_jax.strategies.base import Strategy


@dataclasses.dataclass(frozen=True)
class StaticSkip(layer_skip.LayerSkipDrafting, Strategy):
  """Drafts with the same layers skipped in every round.

  Attributes:
    skip_layers: indices of the skipped layers, each in [0, L).
    num_draft_tokens: K, the most drafts per round.
    draft_exit_threshold: DET, stop drafting below this top-1 probability.
  """

  skip_layers: tuple[int, ...] = ()
  num_draft_tokens: int = 8
  draft_exit_threshold: float = 0.7

  @property
  def name(self) -> str:
    return 'static'

  @property
  def num_skip(self) -> int:
    return len(set(self.skip_layers))

  def validate(self, config):
    self.validate_drafting()
    bad = [i for i in self.skip_layers if not 0 <= i < config.num_layers]
    if bad:
      raise ValueError(f'skip set names layers {bad} outside [0, {config.num_layers})')
    if len(set(self.skip_layers)) >= config.num_layers:
      raise ValueError(f'the skip set skips all {config.num_layers} layers')

  def initial_skip(self, config):
    return layer_skip.skip_vector(config, self.skip_layers)

