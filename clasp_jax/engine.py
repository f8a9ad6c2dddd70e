"""The decoding engine: prefill, then segments of draft/verify rounds that run on the device.

A round proposes drafts (or none: a plain decoding step), verifies `[last token] + drafts` with
the full model in one pass, and commits the accepted prefix. Rounds run in segments: one call
to the device runs a `lax.while_loop` of rounds until the segment's round limit, EOS or the
token budget, so no host synchronisation happens per token. Between segments the host reads
back the segment's report (whether the generation ended, the tokens, the per-round
statistics, the newest CLaSp DP table) and the strategy's `Policy` decides what runs next:
plain decoding runs as one segment; CLaSp, whose verify passes fill the DP's table, runs one
segment per change of its skip set: every LOI rounds the device checks whether the newest
table chooses another set, and only then puts it in force and returns to the host, which
hands the next segment that set's weights.

Exact by construction. Every full-model pass (a plain step as much as a verify pass) is a
pass of `pass_width` tokens (`full_pass`): a plain step pads its one token, a verify pass of
K+1 tokens runs in ceil((K+1) / width) such passes. Every matrix product of a full pass then
has the same shape whatever the pass, and attention reduces over absolute-position blocks
(`attention.cache_attention`), so a token's logits are bit for bit the same whether it was
the only real token of a plain step or row j of a verify pass: every drafting method's greedy
tokens equal plain decoding's, in bfloat16 as in float32. On a CPU the LM head is the one
product left out of the pass: each row's logits are a 1-row product of their own
(`row_logits`), computed only for the rows acceptance reads, so that a plain step pays for one
row of the head rather than `pass_width`. And on a CPU in float32 a pass computes each of its
rows as a 1-row pass would (`Decoder`'s `rows_apart`: products and attention by kernels that
compute a row in one order whatever the others), so there a plain step is a 1-row pass, at a
1-row pass's price, and its token's bits are still those of the same row in a verify pass.

Every shape is static for a given (prompt bucket, cache capacity, active layer count), so after
the first generation nothing recompiles: drafts are padded to K, verification to whole passes,
and rejection only moves the cache length back. `Decoder.compile` compiles everything a
request needs before it is timed.

On a mesh (`Decoder(mesh=...)`) the same programs run tensor-parallel: params and cache sit
where `sharding`'s rules put them, every function is compiled for arguments there, and its
outputs are pinned there, so a generation never moves data between devices but for the
compiler's collectives inside the passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax import attention as attention_lib
from clasp_jax import cpu_attention
from clasp_jax import cpu_product
from clasp_jax import model as model_lib
from clasp_jax import sampling as sampling_lib
from clasp_jax import sharding as sharding_lib
from clasp_jax import widths
from clasp_jax import xla_options
from clasp_jax.cache import KVCache
from clasp_jax.config import LlamaConfig
from clasp_jax.model import Params
from clasp_jax.sampling import SamplingConfig
from clasp_jax.state import DecodeState, SegmentReport
from clasp_jax.strategies import clasp as clasp_lib
from clasp_jax.strategies.base import DRAFT_SOURCES, LOOKUP, PLAIN, Segment, Strategy

#: Prompt tokens per prefill pass on a CPU (`prefill_chunk`).
CPU_PREFILL_CHUNK = 256
_MIN_PROMPT_BUCKET = 32
# Attention reads only the cache blocks a pass needs, so a roomy capacity costs memory, not
# time; one capacity then serves most requests (prompts of up to ~1.7k tokens at 256 new
# tokens), and the rounds, whose shapes depend on it, compile once.
_MIN_CACHE_BUCKET = 2048


@dataclasses.dataclass(frozen=True)
class Generation:
  """One generation's result and statistics.

  Attributes:
    token_ids: the new tokens (an EOS that ended the generation included).
    text: the decoded new tokens, special tokens removed.
    prompt_tokens: the prompt's length in tokens.
    wall_time: seconds from the prompt's ids to the last token, prefill included.
    compile_seconds: the part of `wall_time` spent compiling (0 once compiled).
    accept_lengths: tokens committed per round (tau's samples; the prefill's token excluded).
    draft_lengths: drafts proposed per round.
    draft_sources: where each round's drafts came from: 'plain' (none), 'lookup' (copied
      from the context) or 'skip' (the model with layers skipped).
    skip_sets: bool[rounds, L] the skip set in force in each round.
    refresh_times: seconds the host spent in each skip-set refresh between segments (the
      CLaSp DP, or reading a skip set from its newest table). Where the verify passes fill
      the table, the refreshes that keep the set happen on the device and are not here.
    calibration_seconds: the part of `wall_time`, compilation excluded, that the method's
      policy spent timing the device for its decisions (`adaptive.measure_costs`: a decoder's
      first generation, unless the costs are remembered under a cache directory).
    first_token_seconds: the time to the first token: seconds from the call to the prefill's
      token on the host, compilation excluded, where the generation streamed (the host waits
      for that token then); None where it did not.
  """

  token_ids: list[int]
  text: str
  prompt_tokens: int
  wall_time: float
  compile_seconds: float
  accept_lengths: list[int]
  draft_lengths: list[int]
  draft_sources: list[str]
  skip_sets: np.ndarray
  refresh_times: list[float]
  calibration_seconds: float = 0.0
  first_token_seconds: float | None = None

  @property
  def new_tokens(self) -> int:
    return len(self.token_ids)

  @property
  def decode_seconds(self) -> float:
    """Seconds of decoding: the wall time less compilation and calibration, which a decoder
    pays once."""
    return self.wall_time - self.compile_seconds - self.calibration_seconds

  @property
  def tokens_per_second(self) -> float:
    """New tokens per second of decoding (compilation and calibration excluded)."""
    return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

  @property
  def tokens_per_second_after_first(self) -> float | None:
    """New tokens per second after the first token (the decoding alone, without the prefill
    and a new program's first run in it); None without `first_token_seconds` or a second
    token."""
    if self.first_token_seconds is None or self.new_tokens < 2:
      return None
    seconds = self.decode_seconds - self.first_token_seconds
    return (self.new_tokens - 1) / seconds if seconds > 0 else 0.0

  @property
  def skip_layers_per_round(self) -> list[int | None]:
    """M in force in each round that drafted with layers skipped, None for the others."""
    return [int(s.sum()) if source == 'skip' else None
            for s, source in zip(self.skip_sets, self.draft_sources)]

  @property
  def mean_accepted(self) -> float:
    """tau: mean tokens committed per round (1.0 for plain decoding, and for a generation
    the prefill finished: its one token took one full pass)."""
    return float(np.mean(self.accept_lengths)) if self.accept_lengths else 1.0


def _next_power_of_two(n: int) -> int:
  return 1 << (n - 1).bit_length()


def prompt_bucket(num_tokens: int, max_len: int) -> int:
  """The padded prefill length: the next power of two (at least 32), capped at `max_len`."""
  return min(max(_MIN_PROMPT_BUCKET, _next_power_of_two(num_tokens)), max_len)


def default_logits_by_row() -> bool:
  """Whether a decoder that does not choose takes its logits a row at a time (`row_logits`):
  on a CPU, where the LM head's rows cost time (SmolLM2-135M: 9 rows about three 1-row
  products, docs/results/cpu/row_logits/), so a plain step pays for one row and a verify pass
  for the rows up to its first rejection. Accelerators read the head once for every row of a
  pass."""
  return jax.default_backend() == 'cpu'


def prefill_chunk() -> int | None:
  """Prompt tokens per prefill pass (None: the whole bucket in one pass). `CPU_PREFILL_CHUNK`
  on a CPU, where a bucket's padding and the attention to blocks after a token cost time;
  accelerators run the bucket as one pass."""
  return CPU_PREFILL_CHUNK if jax.default_backend() == 'cpu' else None


def cache_bucket(num_tokens: int, max_new_tokens: int, scratch: int) -> int:
  """The KV cache capacity: room for the prompt, the budget and one round's scratch rows,
  rounded up to a power of two (at least 2048) so that the rounds, whose shapes depend on it,
  compile once per bucket rather than once per prompt length."""
  return max(_MIN_CACHE_BUCKET, _next_power_of_two(num_tokens + max_new_tokens + scratch))


def full_pass(params: Params, config: LlamaConfig, tokens_T: jax.Array, cache: KVCache, *,
              width: int, attention, ride: model_lib.Ride | None = None,
              logits: bool = True, hiddens: bool = True
              ) -> tuple[jax.Array | None, jax.Array | None, KVCache, Any]:
  """The full model over T tokens, as passes of exactly `width` tokens (the last padded).

  Every full-model pass of decoding goes through here, plain steps and verification alike,
  so that a token's logits do not depend on which pass computed them (see the module
  docstring). The padding rows' keys and values land in the cache past the chunk, where
  nothing reads them before a later pass overwrites them. A `ride` (its `first_row` counted
  from the first token, at least T) runs in the padding rows of the last pass. With `logits`
  False the pass stops before the LM head (see `row_logits`); with `hiddens` False (and
  `logits`) it returns no hidden states, and the program stacks no layer's output. Either way
  every layer starts from a materialised input (`model.forward`), so what a layer computes
  does not depend on what the pass returns.

  Returns:
    (logits_TV, hiddens_LTD, cache, ride_ys): float32 logits (None without `logits`) and the
    L+1 pre-norm hidden states of the T tokens (None without `hiddens`), the cache with every
    row written and its length advanced past the padding, and the ride's per-layer outputs
    (None without one).
  """
  assert logits or hiddens, 'a pass returns its logits, its hidden states or both'
  T = tokens_T.shape[0]
  padded_P = jnp.zeros((widths.verify_rows(T - 1, width),), jnp.int32).at[:T].set(tokens_T)
  last = padded_P.shape[0] - width
  if ride is not None:
    if not (T <= ride.first_row and ride.rows.stop <= padded_P.shape[0]):
      raise ValueError(f'riders in rows {ride.rows} do not fit the padding of a pass of {T} '
                       f'tokens at width {width}')
    ride = dataclasses.replace(ride, first_row=ride.first_row - last)
  logit_chunks, hidden_chunks, ride_ys = [], [], None
  for start in range(0, padded_P.shape[0], width):
    # The barriers keep XLA from specialising the pass to the rows its caller reads (a plain
    # step reads one: the LM head and last layer would shrink to a 1-row product, rounded
    # differently) or to padding it can see is constant.
    chunk_1W = jax.lax.optimization_barrier(padded_P[None, start:start + width])
    # The attention alone may skip the padding rows: it computes each row in the same way
    # whichever rows it computes, while the products keep the pass's width.
    num_rows = T - start if start == last and ride is None and T - start < width else None
    out = model_lib.forward(params, config, chunk_1W, cache, attention=attention,
                            ride=ride if start == last else None, num_rows=num_rows)
    logits_WV, hiddens_LWD = jax.lax.optimization_barrier(
        (out.logits_BPV[0] if logits else None, out.hiddens_LBPD[:, 0] if hiddens else None))
    cache = out.cache
    logit_chunks.append(logits_WV)
    hidden_chunks.append(hiddens_LWD)
    ride_ys = out.ride_ys
  logits_TV = jnp.concatenate(logit_chunks)[:T] if logits else None
  hiddens_LTD = jnp.concatenate(hidden_chunks, axis=1)[:, :T] if hiddens else None
  return logits_TV, hiddens_LTD, cache, ride_ys


def row_logits(params: Params, config: LlamaConfig,
               hiddens_LTD: jax.Array) -> Callable[[jax.Array], jax.Array]:
  """Row i's float32 logits [V] from a pass's hidden states, as a 1-row product of the LM head.

  The alternative to a pass's own logits (`full_pass(logits=True)`, a W-row product) where
  rows cost time: a CPU computes rather than waits for memory, and a plain step reads one
  row of W. A 1-row product rounds the same whatever pass the row came from, so decoders that
  all take their logits this way still compare exactly (`Decoder(logits_by_row=...)`).
  """
  final_TD = hiddens_LTD[-1]
  return lambda i: model_lib.lm_head(
      params, config, jax.lax.dynamic_slice_in_dim(final_TD, i, 1))[0]


def _first_token(key: jax.Array, logits_V: jax.Array, sampling: SamplingConfig) -> jax.Array:
  if sampling.greedy:
    return jnp.argmax(logits_V).astype(jnp.int32)
  return sampling_lib.sample(key, sampling_lib.probabilities(logits_V, sampling))


def _is_eos(config: LlamaConfig, tokens: jax.Array) -> jax.Array:
  return jnp.isin(tokens, jnp.asarray(config.eos_token_ids or (-1,)))


def _prefill(params: Params, tokens_P: jax.Array, prompt_len: jax.Array, seed: jax.Array,
             cache: KVCache, *, config: LlamaConfig, sampling: SamplingConfig,
             chunk: int | None = None,
             prompt_attention: model_lib.Attention | None = None) -> DecodeState:
  """Runs the padded prompt, picks the first new token and builds the decode state.

  With a `chunk` (a power of two) shorter than the bucket the prompt runs as passes of that
  many tokens, only as many as hold its tokens, each attending only to the blocks up to its
  own tokens (`prefill_chunk`). The part after the last whole chunk runs as passes of a
  quarter chunk where fewer than four of them hold it, else as one more chunk: padding then
  costs less than a quarter chunk, not up to a whole one (a 769-token prompt: 832 rows, not
  1024).

  The sampling key is made from `seed` (int32) here rather than passed in: making it on its
  own would be one more program for a new process to load before its first token.

  The prefill is the same program for every method of a decoder (no skip set: the policy
  puts a method's first skip set in force), so all of them start from the same cache and
  first token, and a compilation cache serves them all. A prompt run in one pass attends
  through `prompt_attention` where one is given (see `resolve_prompt_attention`), passes
  of a chunked prompt through `attention.cache_attention`, as later chunks read the cache.
  The empty cache comes in as an argument: built inside, it would be a constant that XLA
  spends minutes constant-folding attention over.
  """
  max_len = cache.max_len
  P = tokens_P.shape[0]
  C = min(chunk or P, P)

  def run(first, width, cache, attention=attention_lib.cache_attention):
    """The pass over tokens [first, first + width): the cache it leaves, the logits and the
    hidden states of the last prompt token (meaningful in the pass that holds it)."""
    tokens_1W = jax.lax.dynamic_slice_in_dim(tokens_P, first, width)[None]
    last_11 = jnp.clip(prompt_len - 1 - first, 0, width - 1).reshape(1, 1)
    out = model_lib.forward(params, config, tokens_1W, cache, out_idx_BP=last_11,
                            attention=attention)
    return out.cache, out.logits_BPV[0, 0], out.hiddens_LBPD[:, 0, 0]

  if C == P:
    cache, logits_V, hidden_LD = run(0, P, cache,
                                     prompt_attention or attention_lib.cache_attention)
  else:
    quarter = C // 4
    num_chunks, rest = prompt_len // C, prompt_len % C
    num_tail = (rest + quarter - 1) // quarter  # quarter passes that would hold the rest
    in_quarters = num_tail < 4  # else four quarters: one more whole chunk costs less
    num_chunks = jnp.where(in_quarters, num_chunks, num_chunks + 1)
    num_tail = jnp.where(in_quarters, num_tail, 0)
    carry = (cache, jnp.zeros((config.vocab_size,), jnp.float32),
             jnp.zeros((config.num_layers + 1, config.hidden_size), params['embed'].dtype))
    carry = jax.lax.fori_loop(0, num_chunks, lambda i, carry: run(i * C, C, carry[0]), carry)
    cache, logits_V, hidden_LD = jax.lax.fori_loop(
        0, num_tail, lambda i, carry: run(num_chunks * C + i * quarter, quarter, carry[0]),
        carry)
  rng, key = jax.random.split(jax.random.key(seed))
  first = _first_token(key, logits_V, sampling)
  tokens_N = jnp.zeros((max_len + 1,), jnp.int32)
  tokens_N = jax.lax.dynamic_update_slice(tokens_N, tokens_P, (0,))
  tokens_N = tokens_N.at[prompt_len].set(first)
  max_rounds = max_len  # rounds <= new tokens < capacity
  return DecodeState(
      cache=cache.rollback(prompt_len), tokens_N=tokens_N, num_tokens=prompt_len + 1,
      prompt_len=prompt_len, skip_L=jnp.zeros((config.num_layers,), bool),
      draft_limit=jnp.int32(np.iinfo(np.int32).max),
      target_hidden_LD=hidden_LD, rng=rng, done=_is_eos(config, first),
      num_rounds=jnp.zeros((), jnp.int32), accepted_R=jnp.zeros((max_rounds,), jnp.int32),
      drafted_R=jnp.zeros((max_rounds,), jnp.int32),
      source_R=jnp.zeros((max_rounds,), jnp.int32),
      skip_RL=jnp.zeros((max_rounds, config.num_layers), bool))


def _drafts_per_round(strategy: Strategy, draft: bool) -> int:
  """K, the draft slots of a round (0: a plain step), for a segment that drafts or not."""
  return strategy.num_draft_tokens if draft else 0


def _round(params: Params, state: DecodeState, max_new_tokens: jax.Array, *,
           config: LlamaConfig, strategy: Strategy, sampling: SamplingConfig, width: int,
           attention, draft: bool, logits_by_row: bool = False, search_rows: int = 0,
           choose_riders=clasp_lib.next_riders, keep_hiddens: bool = True) -> DecodeState:
  """One round: propose, verify `[last] + drafts` with the full model, commit, roll back.

  With `draft` False (or a strategy that never drafts) the round is one plain decoding step:
  the same full pass with no drafts in it. With `search_rows` (F > 0) the verify pass also
  computes the next F columns of the CLaSp DP's table (`state.search`) in its padding rows,
  the candidates attending in the pass's own attention (`attention.Riders`) and choosing
  between layers with `choose_riders` (`clasp.next_riders` or its kernel). With
  `logits_by_row` acceptance computes each row's logits on its own (`row_logits`), only as
  far as the drafts hold. With `keep_hiddens` False (the decoder's strategy reads no hidden
  states: `Strategy.reads_hidden_states`) the state keeps the hidden states it had.
  """
  K = _drafts_per_round(strategy, draft)
  if K or not sampling.greedy:
    rng, key_draft, key_accept = jax.random.split(state.rng, 3)
  else:  # a greedy plain step draws nothing
    rng = key_draft = key_accept = state.rng
  length = state.cache.length
  last = state.tokens_N[state.num_tokens - 1]
  if K:
    drafts, state = strategy.propose(params, config, state, sampling, key_draft, attention)
    tokens_K, count, q_KV, source = drafts.tokens_K, drafts.count, drafts.q_KV, drafts.source
    state = state.replace(cache=state.cache.rollback(length))
  else:
    tokens_K, count, q_KV = jnp.zeros((0,), jnp.int32), jnp.zeros((), jnp.int32), None
    source = jnp.int32(PLAIN)
  search, ride = state.search, None
  if search_rows:
    search, ride = clasp_lib.band_ride(search, state.target_hidden_LD, length, first_row=K + 1,
                                       num_rows=search_rows, choose=choose_riders)
  logits_TV, hiddens_LTD, cache, ride_ys = full_pass(
      params, config, jnp.concatenate([last[None], tokens_K]), state.cache, width=width,
      attention=attention, ride=ride, logits=not logits_by_row,
      hiddens=keep_hiddens or logits_by_row)
  if search_rows:
    search = clasp_lib.finish_band(search, ride_ys)
  if q_KV is None and not sampling.greedy:
    q_KV = jnp.zeros((K, config.vocab_size), jnp.float32)
  if logits_by_row:
    logits_at = row_logits(params, config, hiddens_LTD)
    if sampling.greedy:
      n, next_token = sampling_lib.accept_greedy_by_row(tokens_K, count, logits_at)
    else:
      n, next_token = sampling_lib.accept_sampled_by_row(key_accept, tokens_K, count, q_KV,
                                                         logits_at, sampling)
  elif sampling.greedy:
    n, next_token = sampling_lib.accept_greedy(tokens_K, count, logits_TV)
  else:
    n, next_token = sampling_lib.accept_sampled(key_accept, tokens_K, count, q_KV, logits_TV,
                                                sampling)
  committed_T = jnp.where(jnp.arange(K + 1) < n, jnp.concatenate([tokens_K, next_token[None]]),
                          next_token)  # [K+1]: accepted drafts, then the next token
  tokens_N = jax.lax.dynamic_update_slice(state.tokens_N, committed_T, (state.num_tokens,))
  num_tokens = state.num_tokens + n + 1
  done = (jnp.any(_is_eos(config, committed_T) & (jnp.arange(K + 1) <= n))
          | (num_tokens - state.prompt_len >= max_new_tokens))
  r = state.num_rounds
  state = state.replace(
      cache=cache.rollback(length + n + 1), tokens_N=tokens_N, num_tokens=num_tokens,
      target_hidden_LD=hiddens_LTD[:, n] if keep_hiddens else state.target_hidden_LD,
      rng=rng, done=done, num_rounds=r + 1, search=search)
  if not K:  # a plain step's record is its segment's (`_record_plain_rounds`)
    return state
  return state.replace(
      accepted_R=state.accepted_R.at[r].set(n + 1), drafted_R=state.drafted_R.at[r].set(count),
      source_R=state.source_R.at[r].set(source), skip_RL=state.skip_RL.at[r].set(state.skip_L))


def _record_plain_rounds(state: DecodeState, first: jax.Array, skip_L: jax.Array
                         ) -> DecodeState:
  """The records of a plain segment's rounds, from round `first` on, written at once: each
  committed one token and drafted none, under `skip_L`, the set in force when the segment
  began (one it adopts ends it). Written in the loop, they were four small kernels a token.
  """
  r_R = jnp.arange(state.accepted_R.shape[0])
  ran_R = (r_R >= first) & (r_R < state.num_rounds)
  return state.replace(
      accepted_R=jnp.where(ran_R, 1, state.accepted_R),
      drafted_R=jnp.where(ran_R, 0, state.drafted_R),
      source_R=jnp.where(ran_R, PLAIN, state.source_R),
      skip_RL=jnp.where(ran_R[:, None], skip_L[None, :], state.skip_RL))


def _adopt_if_stale(state: DecodeState, at_refresh: jax.Array) -> tuple[DecodeState, jax.Array]:
  """At a refresh, whether the newest complete DP table of the verify passes' search chooses
  a skip set of the in-force size other than the one in force (False before any table is
  complete), and the state with that set put in force if so.

  Putting it in force here (the skip set and the draft's layer indices) spares the host the
  transfer: it only picks the new set's weight buffers (`Decoder.refresh`).
  """
  search = state.search
  choice_L = clasp_lib.backtrack(search.ready_LJ, jnp.sum(state.skip_L, dtype=jnp.int32))
  stale = at_refresh & (search.completed > 0) & jnp.any(choice_L != state.skip_L)
  skip_L = jnp.where(stale, choice_L, state.skip_L)
  ids_A = state.draft_ids_A
  if ids_A is not None:  # the draft's active layers (`drafts_active_layers`), in order
    ids_A = jnp.nonzero(~skip_L, size=ids_A.shape[0])[0].astype(jnp.int32)
  return state.replace(skip_L=skip_L, draft_ids_A=ids_A), stale


def _segment(params: Params, state: DecodeState, max_new_tokens: jax.Array,
             max_rounds: jax.Array, refresh_every: jax.Array, *,
             strategy: Strategy, draft: bool, placement: sharding_lib.Placement | None,
             **round_settings) -> tuple[DecodeState, SegmentReport]:
  """Rounds on the device until `max_rounds` of them ran, EOS or the token budget; the state
  and its report (what the host reads back).

  A round that took a copied draft (prompt lookup) does not count towards `max_rounds`: it
  needs no skip set and costs about a plain step, so a segment's budget (a refresh period, a
  back-off) is spent by the rounds that draft with layers skipped or decode plainly.

  With `refresh_every` > 0 and a search in the state (the DP in the verify passes), the
  segment also ends after every `refresh_every`-th counted round at which the newest complete
  table chooses another skip set (`Segment.refresh_every`), that set in force in the state it
  returns: a refresh that would keep the set in force costs no return to the host.

  On a mesh each round's state is pinned to the rules' shardings, so that the loop carries
  the cache as the segment received it (the compiler could otherwise pick a layout of its
  own and convert at the segment's end).
  """

  def more(carry):
    state, rounds, stale = carry
    return (rounds < max_rounds) & ~state.done & ~stale

  plain = not _drafts_per_round(strategy, draft)  # its records written after the loop

  def one(carry):
    state, rounds, _ = carry
    state = _round(params, state, max_new_tokens, strategy=strategy, draft=draft,
                   **round_settings)
    counted = (jnp.ones((), bool) if plain
               else state.source_R[state.num_rounds - 1] != LOOKUP)
    rounds = rounds + counted.astype(jnp.int32)
    stale = jnp.zeros((), bool)
    if state.search is not None:
      at_refresh = counted & (refresh_every > 0) & (rounds % jnp.maximum(refresh_every, 1) == 0)
      state, stale = _adopt_if_stale(state, at_refresh)
    return (state if placement is None else placement.constrain(state)), rounds, stale

  init = (state, jnp.zeros((), jnp.int32), jnp.zeros((), bool))
  first, skip_L = state.num_rounds, state.skip_L
  state, _, _ = jax.lax.while_loop(more, one, init)
  if plain:
    state = _record_plain_rounds(state, first, skip_L)
  return state, SegmentReport.of(state)


def _choose_skip_set(params: Params, state: DecodeState, num_skip: jax.Array, *,
                     config: LlamaConfig, strategy: Strategy, attention) -> jax.Array:
  return strategy.refresh(params, config, state, num_skip, attention=attention)


def _signature(args) -> tuple[Any, ...]:
  """What a compiled function is specialised on: the pytree structure, shapes and dtypes."""
  leaves, treedef = jax.tree.flatten(args)  # arrays, numpy scalars or ShapeDtypeStructs
  return treedef, tuple((x.shape, x.dtype) for x in leaves)


def _first_run_args(name: str, args: tuple[Any, ...], cache: KVCache) -> tuple[Any, ...]:
  """A program's abstract arguments (`Decoder._programs`) made concrete for a throwaway run: a
  one-token prompt of zeros for the prefill, a state of zeros for the skip-set refresh and for
  a segment, which then runs one round (a token budget of one ends even a segment whose
  rounds all draft from the context, which its round limit does not count), each with
  `cache` (the program's own: it may donate it).

  One round, not none: on an H100 a segment's first run with no round left the plain
  segment's later runs about 6% slower, turn after turn (Spec-Bench, SmolLM2-135M shape),
  where one round or no first run of the segment at all did not
  (docs/results/h100/first_runs/)."""
  def zero(x):
    if not isinstance(x, jax.ShapeDtypeStruct):
      return x
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # a sampling key
      data = jax.eval_shape(jax.random.key_data, x)
      return jax.random.wrap_key_data(np.zeros(data.shape, data.dtype))
    return np.zeros(x.shape, x.dtype)

  def zeros(tree):
    return jax.tree.map(zero, tree)

  if name == 'prefill':  # (params, tokens_P, num_tokens, seed, cache)
    params, tokens_P, _, seed, _ = args
    return params, zeros(tokens_P), np.int32(1), zeros(seed), cache
  params, state, *rest = args
  state, rest = zeros((state.replace(cache=cache), rest))
  if name == 'refresh':  # (params, state, num_skip)
    return params, state, *rest
  _, _, refresh_every = rest  # a segment: (params, state, budget, rounds, period)
  return params, state, np.int32(1), np.int32(1), refresh_every


class _CompiledFunction:
  """A jitted function compiled ahead of time, once per argument signature.

  Compiling explicitly (rather than on a jitted call) lets `Decoder.compile` prepare a
  request without running it, and lets a generation report how long it spent compiling.
  On a mesh (`placement`) it is compiled for arguments in the sharding rules' places, and
  its outputs are pinned there.
  """

  def __init__(self, fn, donate_argnums: tuple[int, ...] = (), precision: str | None = None,
               placement: sharding_lib.Placement | None = None, cpu_kernel: bool | None = None):
    self._fn = fn if placement is None else placement.pin(fn)
    self._donate_argnums = donate_argnums
    self._jitted = jax.jit(self._fn, donate_argnums=donate_argnums,
                           compiler_options=xla_options.compiler_options())
    self._precision = precision
    self._placement = placement
    self._cpu_kernel = cpu_kernel
    self._compiled: dict[Any, Any] = {}
    self.seconds = 0.0

  def compiled(self, *args):
    """The executable for these arguments (concrete or `jax.ShapeDtypeStruct`s)."""
    key = _signature(args)
    executable = self._compiled.get(key)
    if executable is None:
      start = time.perf_counter()
      if self._placement is not None:
        args = self._placement.abstract(args)
      with self._tracing():
        executable = self._compiled[key] = self._jitted.lower(*args).compile()
      self.seconds += time.perf_counter() - start
    return executable

  def lower(self, *args, platform: str) -> jax.stages.Lowered:
    """These arguments' program lowered for `platform`, not compiled (nor kept): traced afresh
    as that platform runs it (`xla_options.lowering_for`: the model's choices by platform
    follow it, not this machine's backend), by a jit of its own, so that no trace made for
    this machine is reused."""
    if self._placement is not None:
      args = self._placement.abstract(args)
    jitted = jax.jit(lambda *a: self._fn(*a), donate_argnums=self._donate_argnums)
    with xla_options.lowering_for(platform), self._tracing():
      return jitted.trace(*args).lower(lowering_platforms=(platform,))

  @contextlib.contextmanager
  def _tracing(self) -> Iterator[None]:
    """The settings the function is traced under: its matmul precision and its CPU
    products."""
    with jax.default_matmul_precision(self._precision), cpu_product.use_kernel(self._cpu_kernel):
      yield

  def __call__(self, *args):
    return self.compiled(*args)(*args)


def enable_compilation_cache(cache_dir: str) -> None:
  """Keeps every compiled program under `<cache_dir>/xla` (JAX's persistent compilation
  cache), so that a later process loads what an earlier one compiled instead of compiling it
  again; identical programs of different decoders (the prefill, plain decoding) are shared."""
  jax.config.update('jax_compilation_cache_dir', os.path.join(cache_dir, 'xla'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def _attention_kind(name: str) -> str:
  """'auto' as what it means here: 'pallas' (the fused kernels) on GPUs, 'xla' elsewhere;
  other names as they are."""
  if name == 'auto':
    return 'pallas' if jax.default_backend() == 'gpu' else 'xla'
  return name


def attention_blocker(name: str) -> str | None:
  """Why the attention `name` ('auto', 'xla' or 'pallas') cannot run on this machine, or None
  where it can: the fused kernels are Triton's, for GPUs."""
  backend = jax.default_backend()
  if _attention_kind(name) == 'pallas' and backend != 'gpu':
    return (f"attention='pallas' is the fused GPU kernel; this machine runs on {backend}: use "
            "'auto' or 'xla'")
  return None


def resolve_attention(name: str, config: LlamaConfig | None = None, mesh=None, *,
                      prefix: bool = False):
  """The cache attention for 'auto' (the fused kernel on GPUs, plain `jnp` elsewhere),
  'xla' (plain `jnp` everywhere) or 'pallas' (the fused GPU kernel); on a mesh, as each
  device runs it on its own heads (`sharding.shard_attention`). `prefix`: the CLaSp DP's
  attention (`attention.prefix_attention`) of the same kind instead."""
  name = _attention_kind(name)
  if name == 'xla':
    attention = attention_lib.prefix_attention if prefix else attention_lib.cache_attention
  elif name == 'pallas':
    from clasp_jax import attention_pallas  # pylint: disable=g-import-not-at-top
    attention = (attention_pallas.prefix_attention_pallas if prefix
                 else attention_pallas.cache_attention_pallas)
  else:
    raise ValueError(f"attention must be 'auto', 'xla' or 'pallas', got {name!r}")
  if mesh is None:
    return attention
  return sharding_lib.shard_attention(attention, config, mesh, kernel=name == 'pallas')


def resolve_prompt_attention(name: str, config: LlamaConfig, dtype, mesh=None
                             ) -> model_lib.Attention | None:
  """The attention of a prompt's one-pass prefill: cuDNN's fused kernel
  (`attention.prompt_attention`) where `name` ('auto', 'xla' or 'pallas', as for
  `resolve_attention`) gives fused kernels and cuDNN takes the model's heads in `dtype`;
  else None, for `attention.cache_attention`. On a mesh each device attends with its own
  heads (`sharding.shard_attention`)."""
  if (_attention_kind(name) != 'pallas'
      or not attention_lib.fused_prompt_attention_runs(config.head_dim, dtype)):
    return None
  if mesh is None:
    return attention_lib.prompt_attention
  return sharding_lib.shard_attention(attention_lib.prompt_attention, config, mesh, kernel=True)


def rows_apart_blocker(dtype, pass_width: int, logits_by_row: bool, cpu_kernel: bool | None,
                       attention, mesh, head_dim: int) -> str | None:
  """Why a decoder's passes cannot compute their rows apart (`Decoder`'s `rows_apart`), or
  None where they can.

  A row's bits must not depend on its pass's other rows: each product and the attention are
  the CPU kernels', which compute a row in one order whatever the others (`cpu_product`,
  `cpu_attention`); each row's logits a 1-row product of their own (`row_logits`). (The plain
  `jnp` attention row by row, `attention.row_attention`, is not enough: in the stacked
  layout's programs XLA compiled it one way in a 3-row pass and another in a 1-row pass.)
  """
  if jax.default_backend() != 'cpu':
    return f'the passes run on {jax.default_backend()}, not a CPU'
  if mesh is not None:
    return 'a mesh multiplies by XLA'
  if jnp.dtype(dtype) != jnp.float32:
    return f'the CPU kernels compute float32, not {jnp.dtype(dtype).name}'
  if not 1 < pass_width <= cpu_product.MAX_ROWS:
    return (f'a pass width of {pass_width} (rows are computed apart in passes of 2 to '
            f'{cpu_product.MAX_ROWS} rows)')
  if not logits_by_row:
    return 'logits_by_row is off'
  if cpu_kernel is False or not cpu_product.available():
    return 'the CPU kernels are off (cpu_kernel=False) or could not be built'
  if attention is not attention_lib.cache_attention:
    return "the attention is the fused GPU kernel ('pallas'), not the CPU's"
  return cpu_attention.head_dim_problem(head_dim)


def resolve_rider_choice(name: str, mesh=None):
  """The CLaSp DP's step between layers for candidates riding a verify pass: the fused
  kernel (`clasp_pallas.next_riders_pallas`) where `name` ('auto', 'xla' or 'pallas', as for
  `resolve_attention`) gives the fused attention on one device, plain `jnp`
  (`clasp.next_riders`) elsewhere."""
  if _attention_kind(name) == 'pallas' and mesh is None:
    from clasp_jax.strategies import clasp_pallas  # pylint: disable=g-import-not-at-top
    return clasp_pallas.next_riders_pallas
  return clasp_lib.next_riders


class Decoder:
  """Generates with one strategy on one model, compiling each shape once.

  Args:
    params: the params pytree.
    config: the model config.
    strategy: the decoding method.
    sampling: greedy (default) or sampling settings.
    tokenizer: optional; used to decode the text of each generation.
    fast_path: per-layer weight buffers read in place (`model.scan_layers`; what pays on GPU
      and TPU, and for narrow passes on a CPU), and off the CPU a draft over the active
      layers' buffers alone (`drafts_active_layers`), instead of a `lax.scan` over stacked
      weights with a `lax.cond` per layer (the reference). None picks by backend and pass
      width (`model.per_layer_by_default`). Each is exact against its own plain decoding; the
      two need not round alike. Params already per layer (`load(per_layer=True)`) stay so:
      the reference then loops over their buffers.
    pass_width: tokens per full-model pass (see the module docstring). Decoders compare
      exactly only at the same width; None: `widths.default_pass_width()`, the same for every
      method of a platform.
    logits_by_row: each token's logits as a 1-row product of the LM head, computed only for
      the rows acceptance reads, instead of the pass's W-row product (see `row_logits`).
      Decoders compare exactly only with the same choice; None: `default_logits_by_row()`,
      the same for every method of a platform.
    attention: 'auto', 'xla' or 'pallas' (see `resolve_attention`; the fused kernels also
      give a prompt's one-pass prefill cuDNN's attention, `resolve_prompt_attention`).
    mesh: a `jax.sharding.Mesh` (or a spec, 'tp:N' or 'auto') to run tensor-parallel on,
      params and cache placed by `sharding`'s rules (params already there stay put); None:
      one device.
    cpu_kernel: on a CPU, a float32 pass's products by the hand-written kernel
      (`cpu_product`), which reads a weight once for a pass's few rows, or (False) by XLA.
      Decoders compare exactly only with the same choice; None: the kernel where it can be
      built, for every method alike, on one device (a mesh multiplies by XLA).
    rows_apart: every full-model pass computes each of its rows as a 1-row pass of that token
      would, bit for bit (the CPU kernels' products and attention), so that a plain step runs
      as a 1-row pass, at a 1-row pass's price, beside `pass_width`-row verify passes, tokens
      unchanged. For a CPU's float32 passes of 2 to `cpu_product.MAX_ROWS` rows with the
      kernels and logits by row, on one device (`rows_apart_blocker`). Decoders compare
      exactly only with the same choice; None: wherever it applies, for every method alike;
      True where it does not: ValueError.
  """

  def __init__(self, params: Params, config: LlamaConfig, strategy: Strategy,
               sampling: SamplingConfig = SamplingConfig(), tokenizer=None,
               fast_path: bool | None = None, pass_width: int | None = None,
               logits_by_row: bool | None = None, attention: str = 'auto', mesh=None,
               cpu_kernel: bool | None = None, rows_apart: bool | None = None):
    strategy.validate(config)
    if pass_width is None:
      pass_width = widths.default_pass_width()
    if logits_by_row is None:
      logits_by_row = default_logits_by_row()
    if pass_width < 1:
      raise ValueError(f'pass_width must be >= 1, got {pass_width}')
    self.mesh = sharding_lib.make_mesh(mesh)
    if cpu_kernel and self.mesh is not None:
      raise ValueError('cpu_kernel=True multiplies on one device; a mesh shards the products')
    if cpu_kernel and jax.default_backend() == 'cpu' and not cpu_product.available():
      raise ValueError('cpu_kernel=True, but the CPU product kernel could not be built (see the '
                       'warning above)')
    if self.mesh is not None:  # the kernel has no sharding rule: XLA would gather its weights
      cpu_kernel = False
    self.config, self.strategy = config, strategy
    self.sampling, self.tokenizer, self.pass_width = sampling, tokenizer, pass_width
    self._attention = attention
    self.logits_by_row = logits_by_row
    if fast_path is None:
      fast_path = model_lib.per_layer_by_default(pass_width)
    self.fast_path = fast_path
    #: Whether a draft runs the active layers' own buffers (`_drafts_run_active_layers`) on
    #: this machine.
    self.drafts_active_layers = self._drafts_run_active_layers()
    self.params = sharding_lib.place_params(params, config, self.mesh, per_layer=fast_path)
    placement = None if self.mesh is None else sharding_lib.Placement(config, self.mesh)
    # What drafting rounds run with: the params, plus the active layers' trees where drafts
    # run those alone.
    self._round_params = self.params
    # float32 means float32: on accelerators JAX's default would multiply in TF32 or bf16.
    precision = 'highest' if self.params['embed'].dtype == jnp.float32 else None
    self._prefill_fn = functools.partial(
        _prefill, config=config, sampling=sampling, chunk=prefill_chunk(),
        prompt_attention=resolve_prompt_attention(attention, config,
                                                  self.params['embed'].dtype, self.mesh))
    # Every program of the decoder: its precision, its placement on the mesh, its CPU products.
    compiled = functools.partial(_CompiledFunction, precision=precision, placement=placement,
                                 cpu_kernel=cpu_kernel)
    self._prefill = compiled(self._prefill_fn, donate_argnums=(4,))
    attend = resolve_attention(attention, config, self.mesh)
    prefix_attend = resolve_attention(attention, config, self.mesh, prefix=True)
    blocker = rows_apart_blocker(self.params['embed'].dtype, pass_width, logits_by_row,
                                 cpu_kernel, attend, self.mesh, config.head_dim)
    if rows_apart and blocker:
      raise ValueError(f'rows_apart=True, but {blocker}')
    #: Whether every pass computes its rows apart, plain steps as 1-row passes (`rows_apart`).
    self.rows_apart = rows_apart is not False and blocker is None
    if self.rows_apart:
      attend = cpu_attention.row_attention
    # The CLaSp DP inside verify passes: F candidates in the rows a verify pass pads.
    self._search_columns = strategy.search_columns(config)
    K = strategy.num_draft_tokens
    search_rows = widths.verify_rows(K, pass_width) - (K + 1) if self._search_columns else 0
    self._search_columns *= search_rows > 0
    #: Verify passes that fill one DP table (1 when there is no such search).
    self.search_passes = -(-(self._search_columns - 1) // search_rows) if search_rows else 1
    kinds = {'plain': (strategy, False, 0), 'draft': (strategy, True, search_rows)}
    if strategy.lookup_strategy is not None:
      kinds['lookup'] = (strategy.lookup_strategy, True, 0)
    #: Rows of a plain step's pass: one where the rows are computed apart, else `pass_width`.
    self.plain_width = 1 if self.rows_apart else pass_width
    self._segments = {
        kind: compiled(
            functools.partial(_segment, strategy=runs, draft=draft,
                              width=pass_width if draft else self.plain_width,
                              logits_by_row=logits_by_row, attention=attend,
                              placement=placement, config=config, sampling=sampling,
                              search_rows=rows, keep_hiddens=strategy.reads_hidden_states,
                              choose_riders=resolve_rider_choice(attention, self.mesh)),
            donate_argnums=(1,))
        for kind, (runs, draft, rows) in kinds.items()}
    # M is traced: one compile serves every M.
    self._choose_skip_set = compiled(
        functools.partial(_choose_skip_set, config=config, strategy=strategy,
                          attention=prefix_attend))
    self.refresh_seconds = []
    self._start_generation()

  def _start_generation(self) -> None:
    """Forgets what the host knew of the last generation's skip sets and DP tables."""
    self._tables_reported = 0  # DP tables this generation's verify passes completed
    self._new_table_LJ = None  # the newest reported table, until a refresh uses it
    self._skip_in_force = None  # the skip set the state holds since a refresh put one in

  @property
  def compile_seconds(self) -> float:
    """Seconds this decoder has spent compiling."""
    return sum(f.seconds for f in (self._prefill, self._choose_skip_set,
                                   *self._segments.values()))

  def stopwatch(self) -> Callable[[], float]:
    """A clock started now: it returns the seconds since, less what this decoder spent
    compiling meanwhile (what a policy's measurements should not count)."""
    started, compiled = time.perf_counter(), self.compile_seconds
    return lambda: time.perf_counter() - started - (self.compile_seconds - compiled)

  def refresh(self, state: DecodeState, num_skip: int) -> DecodeState:
    """Re-chooses the skip set (the strategy's `refresh`, e.g. the CLaSp DP) and puts it in
    force; timed into `refresh_seconds`.

    Where the verify passes fill the DP's table (`state.search`), the newest table reported
    since the last refresh (`SegmentReport.table_LJ`) gives the skip set of `num_skip` layers;
    with none, the set in force stays if it has `num_skip` layers, and the DP runs as a pass
    of its own otherwise (a generation's first refresh), the only case that waits for the
    device. A set the state already holds (the segment that reported the table put it in
    force) is not sent again: only its weight buffers are picked.
    """
    start = time.perf_counter()
    in_force = self._skip_in_force
    if self._search_columns and self._new_table_LJ is not None:
      skip_L = clasp_lib.backtrack_host(self._new_table_LJ, num_skip)
      self._new_table_LJ = None
    elif self._search_columns and in_force is not None and in_force.sum() == num_skip:
      skip_L = in_force  # no newer table: the set in force stays
    else:
      skip_L = self.choose_skip_set(state, num_skip)
    if in_force is None or not np.array_equal(skip_L, in_force):
      state = self.put_skip_set(state, skip_L)
    elif self.drafts_active_layers:  # the state holds it (the device put it in force)
      self._use_layers(skip_L)
    self._skip_in_force = skip_L
    self.refresh_seconds.append(time.perf_counter() - start)
    return state

  def choose_skip_set(self, state: DecodeState, num_skip: int) -> np.ndarray:
    """The strategy's refresh run as a program of its own on `state` (not changed): the skip
    set bool[L] of `num_skip` layers it chooses, read back."""
    bare = state.replace(draft_ids_A=None, search=None)  # whose presence and size vary
    return np.asarray(self._choose_skip_set(self.params, bare, np.int32(num_skip)))

  def put_skip_set(self, state: DecodeState, skip_L: jax.Array) -> DecodeState:
    """Makes `skip_L` the skip set the draft uses.

    Where drafts run the active layers alone (`drafts_active_layers`), they are picked here,
    on the host: their own weight buffers, passed to the rounds beside the params (not in the
    donated state), so nothing is copied. The set and the indices go to the device as plain
    transfers: `jnp.asarray` would compile a program for each new M's indices.
    """
    skip_L = np.asarray(skip_L, bool)
    if not self.drafts_active_layers:
      return state.replace(skip_L=jax.device_put(skip_L))
    skip_L, ids_A = jax.device_put((skip_L, self._use_layers(skip_L)))  # one call for both
    return state.replace(skip_L=skip_L, draft_ids_A=ids_A)

  def _use_layers(self, skip_L: np.ndarray) -> np.ndarray:
    """Makes the drafting rounds run the active layers of `skip_L` from their own weight
    buffers (`drafts_active_layers`); returns their indices."""
    layers, ids_A = model_lib.active_layers(self.params, skip_L)
    self._round_params = dict(self.params, draft_layers=layers)
    return ids_A

  def check_request(self, prompt_ids: list[int], max_new_tokens: int) -> None:
    """Raises ValueError for a request the model cannot serve (before any compilation)."""
    if not prompt_ids:
      raise ValueError('the prompt is empty: give at least one token')
    if max_new_tokens < 1:
      raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
    context = self.config.max_position_embeddings
    if len(prompt_ids) + max_new_tokens > context:
      raise ValueError(f'the prompt ({len(prompt_ids)} tokens) plus max_new_tokens '
                       f'({max_new_tokens}) exceeds the model context ({context} tokens)')
    if min(prompt_ids) < 0 or max(prompt_ids) >= self.config.vocab_size:
      raise ValueError(f'prompt token ids must be in [0, {self.config.vocab_size})')

  def _shapes(self, num_prompt_tokens: int, max_new_tokens: int) -> tuple[int, int]:
    """(prompt bucket, cache capacity) of a request."""
    bucket = prompt_bucket(num_prompt_tokens, self.config.max_position_embeddings)
    scratch = self.verify_rows
    return bucket, max(bucket, cache_bucket(num_prompt_tokens, max_new_tokens, scratch))

  def _cache_program(self, capacity: int):
    """The compiled program that makes an empty cache of `capacity` positions."""
    return sharding_lib.cache_program(self.config, capacity, self.params['embed'].dtype,
                                      self.mesh)

  def _new_cache(self, capacity: int) -> KVCache:
    return self._cache_program(capacity)()

  @property
  def skip_in_force(self) -> np.ndarray | None:
    """The skip set bool[L] the generation's state holds, as the host knows it without
    reading the device (None before a refresh put one in force)."""
    return self._skip_in_force

  @property
  def searches_in_verify(self) -> bool:
    """Whether the verify passes fill the CLaSp DP's table (`Clasp.dp_in_verify` where a
    pass has rows to spare), so that the device can tell when a refresh would change the
    skip set (`Segment.refresh_every`)."""
    return bool(self._search_columns)

  @property
  def verify_rows(self) -> int:
    """Rows of a drafting round's verify pass: K + 1 in whole passes of `pass_width`."""
    return widths.verify_rows(self.strategy.num_draft_tokens, self.pass_width)

  def _segment_args(self, state, segment: Segment, max_new_tokens,
                    round_params: Params | None = None) -> tuple[Any, ...]:
    if segment.kind == 'draft':
      params = self._round_params if round_params is None else round_params
    else:  # no draft layers nor search: the same program whatever the strategy
      params, state = self.params, state.replace(draft_ids_A=None, search=None)
    limit = state.cache.max_len if segment.rounds is None else segment.rounds
    return (params, state, np.int32(max_new_tokens), np.int32(limit),
            np.int32(segment.refresh_every or 0))

  def compile_segment(self, state: DecodeState, segment: Segment) -> None:
    """Compiles the segment `run_segment` would run on this state (concrete or abstract)."""
    self._check_runs_here()
    self._segments[segment.kind].compiled(*self._segment_args(state, segment, 0))

  def run_segment(self, state: DecodeState, segment: Segment,
                  max_new_tokens: int) -> tuple[DecodeState, SegmentReport]:
    """Dispatches a segment of rounds to the device: its state (the input is donated; a
    segment that does not search hands the search it was not given back unchanged) and its
    report. Returns without waiting for the device."""
    out, report = self._segments[segment.kind](
        *self._segment_args(state, segment, max_new_tokens))
    return (out if out.search is not None else out.replace(search=state.search)), report

  def compile(self, num_prompt_tokens: int, max_new_tokens: int,
              first_runs: bool | None = None) -> float:
    """Compiles everything a request of this size may run, without running the request.

    That is the prefill of its prompt bucket, the plain and drafting segments of its cache
    capacity (a drafting segment for every M the strategy may use where drafts run the active
    layers alone, `drafts_active_layers`), the skip-set refresh, and the program that makes
    its empty cache. Benchmarks call it before timing; `generate` compiles what it meets
    otherwise.

    A program's first run costs more than later ones on a GPU: XLA builds its cuDNN graphs
    then and runs its command buffers op by op once (an H100 took 91-158 ms for a SmolLM2
    prefill's first run, 2-6 ms later; `docs/results/h100/first_generation/`); and loading a
    program drops the command buffers of every program loaded before, whose next run is a
    first run again. So where `first_runs`, a call that compiled something then runs each of
    the request's programs once, after loading them all, on zeros (a segment for one round),
    so that the request's first generation runs as later ones do.

    Args:
      num_prompt_tokens: the prompt's length.
      max_new_tokens: the request's token budget.
      first_runs: run the programs once after compiling something (None: on a GPU, where
        a first run costs more than later ones).

    Returns:
      The seconds spent compiling (0 when everything was compiled already; the first runs
      are not counted).
    """
    self._check_runs_here()
    before = self.compile_seconds
    programs = list(self._programs(num_prompt_tokens, max_new_tokens))
    for _, function, args in programs:
      function.compiled(*args)
    capacity = self._shapes(num_prompt_tokens, max_new_tokens)[1]
    self._cache_program(capacity)
    seconds = self.compile_seconds - before
    if first_runs is None:
      first_runs = jax.default_backend() == 'gpu'
    if first_runs and seconds:
      for name, function, args in programs:  # after every load: a load resets command buffers
        jax.block_until_ready(function(*_first_run_args(name, args, self._new_cache(capacity))))
    return seconds

  def lower(self, num_prompt_tokens: int, max_new_tokens: int,
            platform: str) -> dict[str, jax.stages.Lowered]:
    """The programs `compile` would build, lowered for `platform` ('cuda', 'rocm', 'tpu' or
    'cpu') and not compiled: what an accelerator would run, inspected from any machine. The
    decoder's settings are the ones it was built with (its pass width, layout, logits by row);
    how its drafts run follows `platform` (`_drafts_run_active_layers`).

    Keyed by program: 'prefill', 'plain', 'draft M=<M>' (or 'draft'), 'lookup', 'refresh'.
    """
    with xla_options.lowering_for(platform):
      active_layers = self._drafts_run_active_layers()
    lowered = {}
    for name, function, args in self._programs(num_prompt_tokens, max_new_tokens,
                                               active_layers):
      lowered[name] = function.lower(*args, platform=platform)
    return lowered

  def _check_runs_here(self) -> None:
    """Refuses, with one line, to build programs this machine cannot run (a decoder of the
    GPU kernels may be built anywhere, for `lower`); XLA would fail deep in a lowering."""
    blocker = attention_blocker(self._attention)
    if blocker:
      raise ValueError(blocker)

  def _drafts_run_active_layers(self) -> bool:
    """Whether a draft on the platform being traced runs the active layers' own buffers,
    picked on the host at every change of skip set (a program per M), rather than every
    layer's with the skipped ones passed over by a `lax.cond` (one program for every M): on
    the fast path off the CPU, where a conditional costs a read back to the host; a CPU's
    layer loop (`model.loops_over_layers`) runs one for next to nothing."""
    return self.fast_path and not model_lib.loops_over_layers()

  def _programs(self, num_prompt_tokens: int, max_new_tokens: int,
                active_layers: bool | None = None
                ) -> Iterator[tuple[str, _CompiledFunction, tuple[Any, ...]]]:
    """(name, compiled function, abstract arguments) of every program a request may run, its
    drafts over the active layers alone where `active_layers` (None: as on this machine,
    `drafts_active_layers`)."""
    if active_layers is None:
      active_layers = self.drafts_active_layers
    self.check_request([0] * num_prompt_tokens, max_new_tokens)
    bucket, capacity = self._shapes(num_prompt_tokens, max_new_tokens)
    args = (self.params, jax.ShapeDtypeStruct((bucket,), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32),
            jax.eval_shape(lambda: self._new_cache(capacity)))
    yield 'prefill', self._prefill, args
    state = self._with_search(jax.eval_shape(self._prefill_fn, *args),
                              put=lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype))

    def segment_program(name, segment, state=state, round_params=None):
      return (name, self._segments[segment.kind],
              self._segment_args(state, segment, 0, round_params))

    yield segment_program('plain', Segment(draft=False))
    if self.strategy.num_draft_tokens:
      if active_layers and self.strategy.skips_layers:
        for num_skip in self.strategy.skip_counts(self.config):
          num_active = self.config.num_layers - num_skip
          yield segment_program(
              f'draft M={num_skip}', Segment(draft=True),
              state.replace(draft_ids_A=jax.ShapeDtypeStruct((num_active,), jnp.int32)),
              dict(self.params, draft_layers=self.params['layers'][:num_active]))
      else:
        yield segment_program('draft', Segment(draft=True))
    if self.strategy.lookup_strategy is not None:
      yield segment_program('lookup', Segment(draft=True, lookup_only=True))
    if self.strategy.skips_layers:
      yield ('refresh', self._choose_skip_set,
             (self.params, state.replace(search=None), jax.ShapeDtypeStruct((), jnp.int32)))

  def start(self, prompt_ids: list[int], max_new_tokens: int, seed: int = 0) -> DecodeState:
    """The decode state after the prompt's prefill: the first token drawn, no round run yet
    (what `generate` runs its segments on; for benchmarks that time the pieces of a round)."""
    self._check_runs_here()
    self.check_request(prompt_ids, max_new_tokens)
    if not np.iinfo(np.int32).min <= seed <= np.iinfo(np.int32).max:
      raise ValueError(f'seed must fit in 32 bits (signed), got {seed}')
    n = len(prompt_ids)
    bucket, capacity = self._shapes(n, max_new_tokens)
    tokens_P = np.zeros((bucket,), np.int32)
    tokens_P[:n] = prompt_ids
    self._start_generation()
    state = self._prefill(self.params, tokens_P, np.int32(n), np.int32(seed),
                          self._new_cache(capacity))
    return self._with_search(
        state, put=lambda x: sharding_lib.put(x, self.config, self.mesh))

  def _with_search(self, state: DecodeState, put) -> DecodeState:
    """The state with an empty DP search (`clasp.empty_search`, each array through `put`)
    when the verify passes fill the DP's table; unchanged otherwise."""
    if not self._search_columns:
      return state
    empty = clasp_lib.empty_search(self.config, self._search_columns,
                                   state.target_hidden_LD.dtype)
    return state.replace(search=jax.tree.map(put, empty))

  def generate(self, prompt_ids: list[int], max_new_tokens: int, seed: int = 0,
               on_tokens: Callable[[list[int]], None] | None = None) -> Generation:
    """Generates up to `max_new_tokens` tokens after `prompt_ids`.

    Args:
      prompt_ids: the prompt's token ids.
      max_new_tokens: the most new tokens (an EOS ends the generation sooner).
      seed: the sampling seed.
      on_tokens: for streaming: called with each run of new tokens as soon as the host has
        it (the prefill's token, then each segment's), cut at EOS and the budget as the
        result is; the runs together are the result's `token_ids`.
    """
    start, since_start = time.perf_counter(), self.stopwatch()
    compiled_before = self.compile_seconds
    n = len(prompt_ids)
    state = self.start(prompt_ids, max_new_tokens, seed)  # checks the request first
    streamed = self._stream(state, n, max_new_tokens, 0, on_tokens)
    first_token_seconds = since_start() if on_tokens is not None else None
    self.refresh_seconds = []
    policy = self.strategy.make_policy(self, max_new_tokens)
    calibrated_before = policy.calibration_seconds
    rounds = 0
    # A prefill that drew EOS or the whole budget leaves no round to run (nor to compile).
    done = max_new_tokens == 1 or bool(state.done)
    while not done:
      state, segment = policy.next_segment(self, state)
      since_dispatch = self.stopwatch()
      state, report = self.run_segment(state, segment, max_new_tokens)
      report = self._read(report)
      seconds = since_dispatch()
      streamed = self._stream(report, n, max_new_tokens, streamed, on_tokens)
      if policy.observes:
        policy.observe(report.accepted_R[rounds:report.num_rounds],
                       report.drafted_R[rounds:report.num_rounds],
                       report.source_R[rounds:report.num_rounds], seconds=seconds)
      done, rounds = bool(report.done), int(report.num_rounds)
    tokens = self._committed(state, n, max_new_tokens)
    accepted_R, drafted_R, source_R, skip_RL = jax.device_get(
        (state.accepted_R, state.drafted_R, state.source_R, state.skip_RL))
    wall_time = time.perf_counter() - start
    text = (self.tokenizer.decode(tokens, skip_special_tokens=True)
            if self.tokenizer is not None else '')
    return Generation(
        token_ids=tokens, text=text, prompt_tokens=n, wall_time=wall_time,
        compile_seconds=self.compile_seconds - compiled_before,
        calibration_seconds=policy.calibration_seconds - calibrated_before,
        accept_lengths=accepted_R[:rounds].tolist(), draft_lengths=drafted_R[:rounds].tolist(),
        draft_sources=[DRAFT_SOURCES[i] for i in source_R[:rounds]], skip_sets=skip_RL[:rounds],
        refresh_times=self.refresh_seconds, first_token_seconds=first_token_seconds)

  def _read(self, report: SegmentReport) -> SegmentReport:
    """A segment's report read back (one transfer, waiting for the segment), its DP table
    kept for the next refresh and the skip set it left in force noted."""
    report = jax.device_get(report)
    if self._skip_in_force is not None:  # the set the segment left in force, maybe its DP
      self._skip_in_force = report.skip_L  # table's choice (`_adopt_if_stale`)
    if report.table_LJ is not None and report.tables_completed > self._tables_reported:
      self._tables_reported = int(report.tables_completed)
      self._new_table_LJ = report.table_LJ
    return report

  def _committed(self, state: DecodeState | SegmentReport, num_prompt_tokens: int,
                 max_new_tokens: int) -> list[int]:
    """The new tokens committed so far (by a state or a read report), cut after the first EOS
    and at the token budget."""
    num_tokens, tokens_N = jax.device_get((state.num_tokens, state.tokens_N))
    return self._truncate(tokens_N[num_prompt_tokens:int(num_tokens)].tolist(), max_new_tokens)

  def _stream(self, state: DecodeState | SegmentReport, num_prompt_tokens: int,
              max_new_tokens: int, streamed: int,
              on_tokens: Callable[[list[int]], None] | None) -> int:
    """Hands `on_tokens` the committed tokens after the first `streamed` (none: nothing is
    read back); returns how many it has been handed in all."""
    if on_tokens is None:
      return streamed
    tokens = self._committed(state, num_prompt_tokens, max_new_tokens)
    if len(tokens) > streamed:
      on_tokens(tokens[streamed:])
    return max(streamed, len(tokens))

  def _truncate(self, tokens: list[int], max_new_tokens: int) -> list[int]:
    """Cuts the committed tokens after the first EOS and at the token budget."""
    tokens = tokens[:max_new_tokens]
    for i, t in enumerate(tokens):
      if t in self.config.eos_token_ids:
        return tokens[:i + 1]
    return tokens
