"""The round loop: prefill, then draft/verify rounds until EOS or the token budget.

Every shape is static for a given (prompt bucket, max_new_tokens, strategy), so after the first
generation nothing recompiles: drafts are padded to K, the verify pass always has K+1 tokens,
and rejection only moves the cache length back. The host loop reads one boolean per round
(whether to stop) and calls the strategy's `refresh` every LOI rounds; per-round statistics
stay on device and are read once per generation.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax import model as model_lib
from clasp_jax import sampling as sampling_lib
from clasp_jax.cache import KVCache, init_cache
from clasp_jax.config import LlamaConfig
from clasp_jax.model import Params
from clasp_jax.sampling import SamplingConfig
from clasp_jax.strategies.base import Strategy

_MIN_PROMPT_BUCKET = 32
_MIN_CACHE_BUCKET = 256


@flax.struct.dataclass
class DecodeState:
  """Everything a generation carries between rounds (donated to each round).

  Invariant at a round's start: `cache.length == num_tokens - 1`, i.e. every committed token
  but the last is in the cache, and the last is the next round's first verify input.

  Attributes:
    cache: the KV cache.
    tokens_N: int32[N] prompt and committed tokens (entries past `num_tokens` are scratch).
    num_tokens: int32 scalar, committed tokens including the prompt.
    prompt_len: int32 scalar.
    skip_L: bool[L] the skip set the draft uses.
    target_hidden_LD: [L+1, D] pre-norm hidden states of the last accepted token (input of
      the CLaSp DP); zeros for strategies that do not need them.
    rng: PRNG key.
    done: bool scalar, EOS seen or the token budget reached.
    num_rounds: int32 scalar.
    accepted_R: int32[R] tokens committed per round (accepted drafts + 1).
    drafted_R: int32[R] drafts proposed per round.
    skip_RL: bool[R, L] the skip set in force in each round.
    draft_ids_A: int32[L - M] the active layers' indices on the accelerator path, whose
      draft runs those layers' own weights (`Decoder.put_skip_set`); None on the reference
      path.
  """

  cache: KVCache
  tokens_N: jax.Array
  num_tokens: jax.Array
  prompt_len: jax.Array
  skip_L: jax.Array
  target_hidden_LD: jax.Array
  rng: jax.Array
  done: jax.Array
  num_rounds: jax.Array
  accepted_R: jax.Array
  drafted_R: jax.Array
  skip_RL: jax.Array
  draft_ids_A: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Generation:
  """One generation's result and statistics.

  Attributes:
    token_ids: the new tokens (an EOS that ended the generation included).
    text: the decoded new tokens, special tokens removed.
    prompt_tokens: the prompt's length in tokens.
    wall_time: seconds from the prompt's ids to the last token, prefill included.
    accept_lengths: tokens committed per round (tau's samples; the prefill's token excluded).
    draft_lengths: drafts proposed per round.
    skip_sets: bool[rounds, L] the skip set in force in each round.
    refresh_times: seconds spent in each skip-set refresh (the CLaSp DP).
  """

  token_ids: list[int]
  text: str
  prompt_tokens: int
  wall_time: float
  accept_lengths: list[int]
  draft_lengths: list[int]
  skip_sets: np.ndarray
  refresh_times: list[float]

  @property
  def new_tokens(self) -> int:
    return len(self.token_ids)

  @property
  def tokens_per_second(self) -> float:
    return self.new_tokens / self.wall_time if self.wall_time > 0 else 0.0

  @property
  def skip_layers_per_round(self) -> list[int | None]:
    """M in force in each round, None for plain (non-drafting) rounds."""
    return [int(s.sum()) if d else None for s, d in zip(self.skip_sets, self.draft_lengths)]

  @property
  def mean_accepted(self) -> float:
    """tau: mean tokens committed per round (1.0 for plain decoding)."""
    return float(np.mean(self.accept_lengths)) if self.accept_lengths else 0.0


def _next_power_of_two(n: int) -> int:
  return 1 << (n - 1).bit_length()


def prompt_bucket(num_tokens: int, max_len: int) -> int:
  """The padded prefill length: the next power of two (at least 32), capped at `max_len`."""
  return min(max(_MIN_PROMPT_BUCKET, _next_power_of_two(num_tokens)), max_len)


def cache_bucket(num_tokens: int, max_new_tokens: int, num_draft_tokens: int) -> int:
  """The KV cache capacity: room for the prompt, the budget and one round's scratch rows,
  rounded up to a power of two (at least 256) so that the round, whose shapes depend on it,
  compiles once per bucket rather than once per prompt length."""
  return max(_MIN_CACHE_BUCKET,
             _next_power_of_two(num_tokens + max_new_tokens + num_draft_tokens + 1))


def _first_token(key: jax.Array, logits_V: jax.Array, sampling: SamplingConfig) -> jax.Array:
  if sampling.greedy:
    return jnp.argmax(logits_V).astype(jnp.int32)
  return sampling_lib.sample(key, sampling_lib.probabilities(logits_V, sampling))


def _prefill(params: Params, tokens_P: jax.Array, prompt_len: jax.Array, rng: jax.Array,
             cache: KVCache, *, config: LlamaConfig, strategy: Strategy,
             sampling: SamplingConfig, max_rounds: int) -> DecodeState:
  """Runs the padded prompt, picks the first new token and builds the decode state.

  The empty cache comes in as an argument: built inside, it would be a constant that XLA
  spends minutes constant-folding attention over.
  """
  dtype = params['embed'].dtype
  max_len = cache.max_len
  out = model_lib.forward(params, config, tokens_P[None], cache,
                          out_idx_BP=(prompt_len - 1).reshape(1, 1),
                          return_hiddens=strategy.needs_hiddens, empty_cache=True)
  rng, key = jax.random.split(rng)
  first = _first_token(key, out.logits_BPV[0, 0], sampling)
  tokens_N = jnp.zeros((max_len + 1,), jnp.int32)
  tokens_N = jax.lax.dynamic_update_slice(tokens_N, tokens_P, (0,))
  tokens_N = tokens_N.at[prompt_len].set(first)
  L, D = config.num_layers, config.hidden_size
  hidden_LD = (out.hiddens_LBPD[:, 0, 0] if strategy.needs_hiddens
               else jnp.zeros((L + 1, D), dtype))
  skip_L = strategy.initial_skip(config)
  state = DecodeState(
      cache=out.cache.rollback(prompt_len), tokens_N=tokens_N, num_tokens=prompt_len + 1,
      prompt_len=prompt_len, skip_L=skip_L, target_hidden_LD=hidden_LD,
      rng=rng, done=jnp.isin(first, jnp.asarray(config.eos_token_ids or (-1,))),
      num_rounds=jnp.zeros((), jnp.int32), accepted_R=jnp.zeros((max_rounds,), jnp.int32),
      drafted_R=jnp.zeros((max_rounds,), jnp.int32),
      skip_RL=jnp.zeros((max_rounds, L), bool))
  return state


def _verify(params: Params, state: DecodeState, tokens_K: jax.Array, count: jax.Array,
            q_KV: jax.Array | None, key: jax.Array, *, config: LlamaConfig,
            sampling: SamplingConfig, hiddens: bool):
  """Runs `[last] + drafts` through the full model in one pass and accepts a prefix.

  Returns:
    (n, next_token, cache, hidden_LD): drafts accepted, the token after them, the cache with
    the chunk written (length not yet rolled back), and the last accepted token's hidden
    states (the state's own when `hiddens` is False).
  """
  K = tokens_K.shape[0]
  last = state.tokens_N[state.num_tokens - 1]
  chunk_T = jnp.concatenate([last[None], tokens_K])  # [K+1]
  out = model_lib.forward(params, config, chunk_T[None], state.cache, return_hiddens=hiddens)
  logits_TV = out.logits_BPV[0]
  if sampling.greedy:
    n, next_token = sampling_lib.accept_greedy(tokens_K, count, logits_TV)
  else:
    if q_KV is None:
      q_KV = jnp.zeros((K, config.vocab_size), jnp.float32)
    n, next_token = sampling_lib.accept_sampled(key, tokens_K, count, q_KV, logits_TV, sampling)
  hidden_LD = out.hiddens_LBPD[:, 0, n] if hiddens else state.target_hidden_LD
  return n, next_token, out.cache, hidden_LD


def _round(params: Params, state: DecodeState, max_new_tokens: jax.Array, *,
           config: LlamaConfig, strategy: Strategy, sampling: SamplingConfig,
           draft: bool) -> DecodeState:
  """One round: propose, verify `[last] + drafts` in one pass, commit, roll back.

  With `draft` False (or a strategy that never drafts) the round is one plain decoding step,
  without the hidden states a refresh would read. A strategy that may propose nothing (prompt
  lookup without a match) takes a one-token step in that case instead of a K+1 verify pass.
  """
  K = strategy.num_draft_tokens if draft else 0
  rng, key_draft, key_accept = jax.random.split(state.rng, 3)
  length = state.cache.length
  verify = functools.partial(_verify, config=config, sampling=sampling,
                             hiddens=strategy.needs_hiddens and draft)
  if K:
    drafts, state = strategy.propose(params, config, state, sampling, key_draft)
    tokens_K, count = drafts.tokens_K, drafts.count
    state = state.replace(cache=state.cache.rollback(length))
    n, next_token, cache, hidden_LD = verify(params, state, tokens_K, count, drafts.q_KV,
                                             key_accept)
    if strategy.may_propose_nothing:
      n, next_token, cache, hidden_LD = jax.lax.cond(
          count > 0, lambda: (n, next_token, cache, hidden_LD),
          lambda: verify(params, state, tokens_K[:0], count, None, key_accept))
  else:
    tokens_K, count = jnp.zeros((0,), jnp.int32), jnp.zeros((), jnp.int32)
    n, next_token, cache, hidden_LD = verify(params, state, tokens_K, count, None, key_accept)
  committed_T = jnp.where(jnp.arange(K + 1) < n, jnp.concatenate([tokens_K, next_token[None]]),
                          next_token)  # [K+1]: accepted drafts, then the next token
  tokens_N = jax.lax.dynamic_update_slice(state.tokens_N, committed_T, (state.num_tokens,))
  num_tokens = state.num_tokens + n + 1
  is_eos_T = jnp.isin(committed_T, jnp.asarray(config.eos_token_ids or (-1,)))
  done = (jnp.any(is_eos_T & (jnp.arange(K + 1) <= n))
          | (num_tokens - state.prompt_len >= max_new_tokens))
  r = state.num_rounds
  return state.replace(
      cache=cache.rollback(length + n + 1), tokens_N=tokens_N, num_tokens=num_tokens,
      target_hidden_LD=hidden_LD, rng=rng, done=done, num_rounds=r + 1,
      accepted_R=state.accepted_R.at[r].set(n + 1), drafted_R=state.drafted_R.at[r].set(count),
      skip_RL=state.skip_RL.at[r].set(state.skip_L))


def _choose_skip_set(params: Params, state: DecodeState, num_skip: jax.Array, *,
                     config: LlamaConfig, strategy: Strategy) -> jax.Array:
  return strategy.refresh(params, config, state, num_skip)


class Decoder:
  """Generates with one strategy on one model, compiling each shape once.

  Args:
    params: the params pytree.
    config: the model config.
    strategy: the decoding method.
    sampling: greedy (default) or sampling settings.
    tokenizer: optional; used to decode the text of each generation.
    fast_path: per-layer weight buffers looped over in Python, and a draft over the active
      layers' buffers alone (what pays on GPU and TPU), instead of a `fori_loop` over
      stacked weights with a `lax.cond` per layer (the reference, and faster on CPU). None
      picks by backend. Both give identical tokens.
  """

  def __init__(self, params: Params, config: LlamaConfig, strategy: Strategy,
               sampling: SamplingConfig = SamplingConfig(), tokenizer=None,
               fast_path: bool | None = None):
    strategy.validate(config)
    self.params, self.config, self.strategy = params, config, strategy
    self.sampling, self.tokenizer = sampling, tokenizer
    if fast_path is None:
      fast_path = jax.default_backend() != 'cpu'
    self.fast_path = fast_path
    if fast_path:
      self.params = model_lib.unstack_layers(params)
    # What rounds run with: the params, plus the active layers' trees on the fast path.
    self._round_params = self.params
    static = dict(config=config, strategy=strategy, sampling=sampling)
    self._prefill = jax.jit(functools.partial(_prefill, **static),
                            static_argnames=('max_rounds',), donate_argnums=(4,))
    self._rounds = {draft: jax.jit(functools.partial(_round, draft=draft, **static),
                                   donate_argnums=(1,)) for draft in (True, False)}
    # M is traced: one compile serves every M.
    self._choose_skip_set = jax.jit(functools.partial(_choose_skip_set, config=config,
                                                      strategy=strategy))
    self.refresh_seconds = []

  def refresh(self, state: DecodeState, num_skip: int) -> DecodeState:
    """Re-chooses the skip set (the strategy's `refresh`, e.g. the CLaSp DP) and puts it in
    force; timed into `refresh_seconds`."""
    t0 = time.perf_counter()
    bare = state.replace(draft_ids_A=None)  # whose presence and size vary
    skip_L = self._choose_skip_set(self.params, bare, np.int32(num_skip))
    state = self.put_skip_set(state, skip_L)
    state.skip_L.block_until_ready()
    self.refresh_seconds.append(time.perf_counter() - t0)
    return state

  def put_skip_set(self, state: DecodeState, skip_L: jax.Array) -> DecodeState:
    """Makes `skip_L` the skip set the draft uses.

    On the accelerator path the draft's layers are picked here, on the host: the active
    layers' own weight buffers, passed to the rounds beside the params (not in the donated
    state), so nothing is copied.
    """
    if not self.fast_path:
      return state.replace(skip_L=jnp.asarray(skip_L))
    layers, ids_A = model_lib.active_layers(self.params, skip_L)
    self._round_params = dict(self.params, draft_layers=layers)
    return state.replace(skip_L=jnp.asarray(skip_L), draft_ids_A=jnp.asarray(ids_A))

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

  def generate(self, prompt_ids: list[int], max_new_tokens: int, seed: int = 0) -> Generation:
    """Generates up to `max_new_tokens` tokens after `prompt_ids`."""
    self.check_request(prompt_ids, max_new_tokens)
    start = time.perf_counter()
    n = len(prompt_ids)
    bucket = prompt_bucket(n, self.config.max_position_embeddings)
    max_len = max(bucket, cache_bucket(n, max_new_tokens, self.strategy.num_draft_tokens))
    tokens_P = np.zeros((bucket,), np.int32)
    tokens_P[:n] = prompt_ids
    cache = init_cache(self.config, max_len, dtype=self.params['embed'].dtype)
    state = self._prefill(self.params, tokens_P, np.int32(n), jax.random.key(seed), cache,
                          max_rounds=max_new_tokens)
    self.refresh_seconds = []
    budget = np.int32(max_new_tokens)
    policy = self.strategy.make_policy(self)
    if policy is None and self.strategy.num_skip is not None and not self.strategy.loi:
      state = self.put_skip_set(state, state.skip_L)  # a fixed set: in force from the start
    rounds = 0
    while not bool(state.done):
      if policy is not None:
        state, draft = policy.before_round(self, state)
      else:
        draft = True
        if self.strategy.loi and rounds % self.strategy.loi == 0:
          state = self.refresh(state, self.strategy.num_skip)
      t0 = time.perf_counter()
      state = self._rounds[draft](self._round_params if draft else self.params, state, budget)
      rounds += 1
      if policy is not None and draft:  # plain rounds teach the policy nothing: no reads
        accepted_R, drafted_R = jax.device_get((state.accepted_R, state.drafted_R))
        policy.after_round(int(accepted_R[rounds - 1]), int(drafted_R[rounds - 1]),
                           time.perf_counter() - t0)
    tokens = self._truncate(np.asarray(state.tokens_N)[n:int(state.num_tokens)].tolist(),
                            max_new_tokens)
    wall_time = time.perf_counter() - start
    text = self.tokenizer.decode(tokens) if self.tokenizer is not None else ''
    return Generation(
        token_ids=tokens, text=text, prompt_tokens=n, wall_time=wall_time,
        accept_lengths=np.asarray(state.accepted_R[:rounds]).tolist(),
        draft_lengths=np.asarray(state.drafted_R[:rounds]).tolist(),
        skip_sets=np.asarray(state.skip_RL[:rounds]), refresh_times=self.refresh_seconds)

  def _truncate(self, tokens: list[int], max_new_tokens: int) -> list[int]:
    """Cuts the committed tokens after the first EOS and at the token budget."""
    tokens = tokens[:max_new_tokens]
    for i, t in enumerate(tokens):
      if t in self.config.eos_token_ids:
        return tokens[:i + 1]
    return tokens
