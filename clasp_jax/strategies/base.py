"""What every decoding strategy provides to the round loop, and how rounds are scheduled.

A strategy proposes up to K draft tokens per round; the engine verifies them with the full
model, accepts a prefix and commits it. Rounds run on the device in segments, many rounds per
call; between segments a `Policy` on the host decides what the next segment does (draft or
decode plainly, for how many rounds) and may re-choose the skip set. Strategies that skip
layers refresh their skip set from the hidden states of the last accepted token.
"""

from __future__ import annotations

import abc
import dataclasses

import jax
import numpy as np

from clasp_jax import attention as attention_lib
from clasp_jax.config import LlamaConfig
from clasp_jax.model import Attention, Params
from clasp_jax.sampling import SamplingConfig
from clasp_jax.state import DecodeState


#: Where a round's drafts came from, by the code recorded per round (`DecodeState.source_R`):
#: none (a plain step), copied from the context (prompt lookup), or the model with layers
#: skipped.
DRAFT_SOURCES = ('plain', 'lookup', 'skip')
PLAIN, LOOKUP, SKIP = range(len(DRAFT_SOURCES))


@dataclasses.dataclass(frozen=True)
class Drafts:
  """A round's proposal.

  Attributes:
    tokens_K: int32[K] drafted ids (entries past `count` are padding).
    count: int32 scalar, how many drafts are real.
    q_KV: float32[K, V] the draft distributions the tokens were sampled from, or None when
      decoding greedily.
    source: int32 scalar, where they came from (an index into DRAFT_SOURCES).
  """

  tokens_K: jax.Array
  count: jax.Array
  q_KV: jax.Array | None
  source: jax.Array


jax.tree_util.register_dataclass(
    Drafts, data_fields=['tokens_K', 'count', 'q_KV', 'source'], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class Segment:
  """What the next call to the device runs.

  Attributes:
    draft: whether its rounds draft (False: plain decoding steps).
    rounds: the most rounds it runs, not counting those that took a copied draft (prompt
      lookup: they need no skip set and cost about a plain step); None: until the generation
      ends. A segment always stops at EOS or the token budget.
    lookup_only: its rounds draft by prompt lookup alone (plain steps where the context has no
      match): the rounds of the strategy's `lookup_strategy`, for a policy's stretches without
      layer-skip drafts.
    refresh_every: where the verify passes fill the CLaSp DP's table, also end the segment
      after every `refresh_every`-th counted round at which the newest complete table chooses
      a skip set (of the in-force size) other than the one in force, that set put in force
      on the device and the host following it with the set's weights; a table that keeps the
      set lets the rounds run on. The host's refresh then keeps what the device chose
      (`Decoder.refresh`), so the skip sets in force are those of segments of
      `refresh_every` rounds, with fewer returns to the host. None: no check.
  """

  draft: bool
  rounds: int | None = None
  lookup_only: bool = False
  refresh_every: int | None = None

  def __post_init__(self):
    # A segment of no round would run a program for nothing; on a GPU such a run also left
    # the program's later runs slower (docs/results/h100/first_runs/).
    if self.rounds is not None and self.rounds < 1:
      raise ValueError(f'a segment runs at least one round, got rounds={self.rounds}')

  @property
  def kind(self) -> str:
    """'plain', 'draft' or 'lookup': which compiled program runs it."""
    return 'lookup' if self.lookup_only else 'draft' if self.draft else 'plain'


class Strategy(abc.ABC):
  """A decoding method: how drafts are proposed, and how its skip set is refreshed.

  Subclasses are frozen dataclasses, so they are hashable static arguments of `jax.jit`.
  """

  #: K, the number of draft slots per round (0: plain decoding).
  num_draft_tokens: int = 0
  #: Refresh the skip set every `loi` rounds (None: never).
  loi: int | None = None
  #: M for strategies that draft by skipping a fixed number of layers (None: they do not);
  #: with no `loi`, their initial skip set is put in force once, at the start.
  num_skip: int | None = None
  #: Whether drafts come from the model with layers skipped (the draft needs a skip set).
  skips_layers: bool = False
  #: Whether it reads the last accepted token's hidden states (`state.target_hidden_LD`, a
  #: CLaSp DP's input): rounds of a strategy that does not neither keep them nor stack every
  #: layer's output to take them from.
  reads_hidden_states: bool = False

  @property
  def name(self) -> str:
    return type(self).__name__.lower()

  def validate(self, config: LlamaConfig) -> None:
    """Raises ValueError when the strategy's settings do not fit the model."""

  def initial_skip(self, config: LlamaConfig) -> jax.Array:
    """The skip set in force before the first refresh: bool[L]."""
    return jax.numpy.zeros((config.num_layers,), bool)

  @property
  def lookup_strategy(self) -> Strategy | None:
    """The prompt-lookup strategy whose rounds run the policy's `lookup_only` segments (with
    the same K, so that its verify passes have the same shape); None: it has none."""
    return None

  def search_columns(self, config: LlamaConfig) -> int:
    """Columns J (the largest M + 1) of a CLaSp DP table that verify passes fill in their
    spare rows (`strategies.clasp.band_ride`); 0: the strategy has no such search."""
    del config
    return 0

  def skip_counts(self, config: LlamaConfig) -> tuple[int, ...]:
    """Every M a drafting round of this strategy may run with: where drafts run the active
    layers alone (`Decoder.drafts_active_layers`) each compiles its own round, so a run
    compiles them all before timing anything."""
    return () if self.num_skip is None else (self.num_skip,)

  @abc.abstractmethod
  def propose(self, params: Params, config: LlamaConfig, state: DecodeState,
              sampling: SamplingConfig, key: jax.Array, attention) -> tuple[Drafts, DecodeState]:
    """Drafts up to K tokens after the last committed one (jittable).

    May write speculative rows into the cache; the engine rolls its length back before
    verifying, so only `state.cache` contents past the committed length may change.
    `attention` is the cache attention the model runs with (see `model.forward`).
    """

  def refresh(self, params: Params, config: LlamaConfig, state: DecodeState, num_skip: int,
              attention: Attention = attention_lib.prefix_attention) -> jax.Array:
    """A new skip set bool[L] of `num_skip` layers from `state.target_hidden_LD` (jittable;
    `num_skip` may be traced, so that one compile serves every M). `attention` is the
    prefix attention a DP's pseudo-tokens run with (`attention.prefix_attention`'s
    signature)."""
    return state.skip_L

  def make_policy(self, decoder, max_new_tokens: int) -> Policy:
    """The host-side controller of one generation's segments."""
    del decoder, max_new_tokens  # a fixed schedule needs neither
    return SchedulePolicy(self)


class Policy(abc.ABC):
  """Decides, between segments of rounds, what the next segment runs.

  Runs on the host. A segment is one call to the device; the engine reads back only whether
  the generation ended, and the segment's per-round statistics when `observes` is set.
  """

  #: Whether `observe` wants each segment's per-round statistics.
  observes: bool = False
  #: Seconds the policy has spent timing the device for its decisions (compilation excluded),
  #: over all its generations: one-off work that a generation's decoding speed leaves out.
  calibration_seconds: float = 0.0

  @abc.abstractmethod
  def next_segment(self, decoder, state: DecodeState) -> tuple[DecodeState, Segment]:
    """Returns the (possibly re-skipped) state and the segment to run next."""

  def observe(self, accepted_R: np.ndarray, drafted_R: np.ndarray, source_R: np.ndarray,
              seconds: float | None = None) -> None:
    """The segment just run: tokens committed, drafts proposed and where they came from
    (`DRAFT_SOURCES`), in each of its rounds; and the seconds from its dispatch to its report
    read back, compilation excluded (None: not timed)."""


def refresh_period(loi: int, decoder) -> int:
  """Rounds between two refreshes asked for every `loi`: `Decoder.search_passes`, if more,
  since where the verify passes fill the DP's table no newer table is ready sooner."""
  return max(loi, decoder.search_passes)


class SchedulePolicy(Policy):
  """A fixed schedule: draft in every round (plain decoding if K is 0), refreshing the skip
  set every `loi` rounds (`refresh_period`), or putting a fixed skip set in force once. Where
  the verify passes fill the DP's table, one segment runs until a refresh would change the set
  (`Segment.refresh_every`)."""

  def __init__(self, strategy: Strategy):
    self.strategy = strategy
    self.started = False

  def next_segment(self, decoder, state):
    s = self.strategy
    if not s.num_draft_tokens:
      return state, Segment(draft=False)
    if s.loi:
      period = refresh_period(s.loi, decoder)
      segment = (Segment(draft=True, refresh_every=period) if decoder.searches_in_verify
                 else Segment(draft=True, rounds=period))
      return decoder.refresh(state, s.num_skip), segment
    if s.skips_layers and not self.started:  # a fixed set: in force from the start
      state = decoder.put_skip_set(state, s.initial_skip(decoder.config))
    self.started = True
    return state, Segment(draft=True)
