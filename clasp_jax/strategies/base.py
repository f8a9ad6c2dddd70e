"""What every decoding strategy provides to the round loop.

A strategy proposes up to K draft tokens per round; the engine verifies them with the full
model, accepts a prefix and commits it. Strategies that choose a layer-skip set also refresh
it every `loi` rounds from the hidden states of the last accepted token.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING

import jax

from clasp_jax.config import LlamaConfig
from clasp_jax.model import Params
from clasp_jax.sampling import SamplingConfig

if TYPE_CHECKING:
  from clasp_jax.engine import DecodeState


@dataclasses.dataclass(frozen=True)
class Drafts:
  """A round's proposal.

  Attributes:
    tokens_K: int32[K] drafted ids (entries past `count` are padding).
    count: int32 scalar, how many drafts are real.
    q_KV: float32[K, V] the draft distributions the tokens were sampled from, or None when
      decoding greedily.
  """

  tokens_K: jax.Array
  count: jax.Array
  q_KV: jax.Array | None


class Strategy(abc.ABC):
  """A decoding method: how drafts are proposed, and how its skip set is refreshed.

  Subclasses are frozen dataclasses, so they are hashable static arguments of `jax.jit`.
  """

  #: K, the number of draft slots per round (0: plain decoding).
  num_draft_tokens: int = 0
  #: Whether a round may propose no draft at all (then it takes a plain one-token step).
  may_propose_nothing: bool = False
  #: Whether the verify pass must return hidden states for `refresh`.
  needs_hiddens: bool = False
  #: Refresh the skip set every `loi` rounds (None: never).
  loi: int | None = None
  #: M for strategies that draft by skipping a fixed number of layers (None: they do not);
  #: with no `loi`, their initial skip set is put in force once, at the start.
  num_skip: int | None = None

  @property
  def name(self) -> str:
    return type(self).__name__.lower()

  def validate(self, config: LlamaConfig) -> None:
    """Raises ValueError when the strategy's settings do not fit the model."""

  def initial_skip(self, config: LlamaConfig) -> jax.Array:
    """The skip set in force before the first refresh: bool[L]."""
    return jax.numpy.zeros((config.num_layers,), bool)

  @abc.abstractmethod
  def propose(self, params: Params, config: LlamaConfig, state: DecodeState,
              sampling: SamplingConfig, key: jax.Array) -> tuple[Drafts, DecodeState]:
    """Drafts up to K tokens after the last committed one (jittable).

    May write speculative rows into the cache; the engine rolls its length back before
    verifying, so only `state.cache` contents past the committed length may change.
    """

  def refresh(self, params: Params, config: LlamaConfig, state: DecodeState,
              num_skip: int) -> jax.Array:
    """A new skip set bool[L] of `num_skip` layers from `state.target_hidden_LD` (jittable;
    `num_skip` may be traced, so that one compile serves every M)."""
    return state.skip_L

  def make_policy(self, decoder) -> Policy | None:
    """A host-side controller for one generation (None: refresh every `loi` rounds)."""
    return None


class Policy(abc.ABC):
  """Decides, between rounds, whether the next round drafts and with which skip set.

  For strategies whose choices depend on what a generation observes (the adaptive skip
  budget, ConfLayers' search). Runs on the host; reads one round's statistics at a time.
  """

  @abc.abstractmethod
  def before_round(self, decoder, state: DecodeState) -> tuple[DecodeState, bool]:
    """Returns the (possibly re-skipped) state and whether the next round drafts."""

  @abc.abstractmethod
  def after_round(self, accepted: int, drafted: int, seconds: float) -> None:
    """Observes the round just run: tokens committed, drafts proposed, wall time."""
