"""Plain autoregressive decoding: no drafts, one full-model token per round."""

from __future__ import annotations

import dataclasses

from clasp_jax.strategies.base import Strategy


@dataclasses.dataclass(frozen=True)
class Vanilla(Strategy):
  """The baseline every speedup is measured against (tau = 1)."""

  def propose(self, params, config, state, sampling, key, attention):
    raise NotImplementedError('plain decoding drafts nothing (num_draft_tokens is 0)')
