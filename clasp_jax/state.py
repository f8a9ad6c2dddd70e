"""What a generation carries between rounds: the decode state, a registered dataclass."""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from clasp_jax.cache import KVCache


@flax.struct.dataclass
class SearchState:
  """The CLaSp DP's table, filled inside verify passes (`strategies.clasp.band_ride`).

  A verify pass has rows to spare past its K + 1 tokens; the DP's candidate states ride
  there, F of the table's columns (a band) per pass, all L layers each time, so that the DP
  reads no weight the verify pass does not already read. A table of M columns fills in
  ceil(M / F) passes, all for one target token (the last token in the cache when its first
  band ran), whose states and prefix do not change meanwhile.

  Attributes:
    band: int32 scalar, the band the next verify pass computes (0: it starts a new table).
    pos: int32 scalar, the target token's position.
    target_LD: [L+1, D] the target's pre-norm hidden states (h_0 = its embedding).
    edge_LD: [L+1, D] per layer input i, the state in the column before the next band's
      first, g(i, j0 - 1) (band 0: the target's own states, g(i, 0)).
    table_LJ: bool[L, J] the table being filled (J = the largest M + 1).
    ready_LJ: bool[L, J] the newest complete table (see `strategies.clasp.backtrack`).
    completed: int32 scalar, tables completed so far in this generation.
  """

  band: jax.Array
  pos: jax.Array
  target_LD: jax.Array
  edge_LD: jax.Array
  table_LJ: jax.Array
  ready_LJ: jax.Array
  completed: jax.Array


@flax.struct.dataclass
class DecodeState:
  """Everything a generation carries between rounds (donated to each segment of rounds).

  Invariant at a round's start: `cache.length == num_tokens - 1`, i.e. every committed token
  but the last is in the cache, and the last is the next round's first verify input.

  Attributes:
    cache: the KV cache.
    tokens_N: int32[N] prompt and committed tokens (entries past `num_tokens` are scratch).
    num_tokens: int32 scalar, committed tokens including the prompt.
    prompt_len: int32 scalar.
    skip_L: bool[L] the skip set the draft uses.
    draft_limit: int32 scalar, the most drafts a layer-skip draft may propose in a round (K
      bounds it too); a policy lowers it to probe cheaply whether drafting pays.
    target_hidden_LD: [L+1, D] pre-norm hidden states of the last token the cache holds
      (h_0 = its embedding), from the last full-model pass: the input of the CLaSp DP.
    rng: PRNG key.
    done: bool scalar, EOS seen or the token budget reached.
    num_rounds: int32 scalar.
    accepted_R: int32[R] tokens committed per round (accepted drafts + 1).
    drafted_R: int32[R] drafts proposed per round.
    source_R: int32[R] where each round's drafts came from (`base.DRAFT_SOURCES`).
    skip_RL: bool[R, L] the skip set in force in each round.
    draft_ids_A: int32[L - M] the active layers' indices on the accelerator path, whose
      draft runs those layers' own weights (`Decoder.put_skip_set`); None otherwise.
    search: the CLaSp DP filled inside verify passes, for strategies that search so;
      None otherwise.
  """

  cache: KVCache
  tokens_N: jax.Array
  num_tokens: jax.Array
  prompt_len: jax.Array
  skip_L: jax.Array
  draft_limit: jax.Array
  target_hidden_LD: jax.Array
  rng: jax.Array
  done: jax.Array
  num_rounds: jax.Array
  accepted_R: jax.Array
  drafted_R: jax.Array
  source_R: jax.Array
  skip_RL: jax.Array
  draft_ids_A: jax.Array | None = None
  search: SearchState | None = None


def _report_field(name: str, doc: str, boolean: bool = False) -> property:
  """A `SegmentReport` field as a property: its part of `flat_X` (None when absent)."""
  def get(report):
    offset = 0
    for field, shape in report.layout:
      size = math.prod(shape)
      if field == name:
        part = report.flat_X[offset:offset + size].reshape(shape)
        return part != 0 if boolean else part
      offset += size
    return None
  return property(get, doc=doc)


@flax.struct.dataclass
class SegmentReport:
  """What the host reads back after a segment of rounds: copies of the decode state's small
  fields, returned beside the state, packed into one int32 vector.

  The state itself is donated to the next segment, so what the host keeps of a segment (the
  newest DP table, for the next refresh) comes from the report. Packed, reading it back is one
  transfer from the device rather than one per field: on an H200, 0.8-0.9 ms at a return to
  the host against 1.2-1.8 ms (a quarter of a plain step at the LLaMA-3-8B shape, two at the
  SmolLM2 shape). `jax.device_get(report)` reads it; its fields (the properties below) are
  views of `flat_X`, on the device or on the host alike.

  Attributes:
    flat_X: int32[X] the fields present, flattened, in the order `of` packs them.
    layout: static ((field name, shape), ...) of the fields present in `flat_X`.
  """

  flat_X: jax.Array
  layout: tuple[tuple[str, tuple[int, ...]], ...] = flax.struct.field(pytree_node=False)

  done = _report_field('done', 'bool scalar, as in `DecodeState`.', boolean=True)
  num_rounds = _report_field('num_rounds', 'int32 scalar, rounds run so far in the generation.')
  num_tokens = _report_field('num_tokens', 'int32 scalar, committed tokens with the prompt.')
  tokens_N = _report_field('tokens_N', 'int32[N] prompt and committed tokens (streaming).')
  accepted_R = _report_field('accepted_R', 'int32[R] tokens committed per round.')
  drafted_R = _report_field('drafted_R', 'int32[R] drafts proposed per round.')
  source_R = _report_field('source_R', "int32[R] where each round's drafts came from.")
  skip_L = _report_field('skip_L', "bool[L] the skip set in force at the segment's end.",
                         boolean=True)
  tables_completed = _report_field(
      'tables_completed', 'int32 scalar, CLaSp DP tables the verify passes completed so far '
      '(`SearchState.completed`; 0 without such a search).')
  table_LJ = _report_field(
      'table_LJ', 'bool[L, J] the newest complete DP table (`SearchState.ready_LJ`); None '
      'without such a search.', boolean=True)

  @classmethod
  def of(cls, state: DecodeState) -> SegmentReport:
    """The report of a state (traced, at a segment's end)."""
    search = state.search
    fields = dict(done=state.done, num_rounds=state.num_rounds, num_tokens=state.num_tokens,
                  tokens_N=state.tokens_N, accepted_R=state.accepted_R,
                  drafted_R=state.drafted_R, source_R=state.source_R, skip_L=state.skip_L,
                  tables_completed=jnp.int32(0) if search is None else search.completed,
                  table_LJ=None if search is None else search.ready_LJ)
    present = [(name, x) for name, x in fields.items() if x is not None]
    return cls(flat_X=jnp.concatenate([jnp.ravel(x).astype(jnp.int32) for _, x in present]),
               layout=tuple((name, tuple(x.shape)) for name, x in present))
