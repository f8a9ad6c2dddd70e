"""Is the full-model pass bit for bit reproducible on this device? Random weights of a preset.

  python scripts/check_determinism.py --preset=smollm2-135m --methods=pld,static

The engine's exactness rests on one token's logits coming out of every full pass bit for bit
the same (`engine.full_pass`). This runs one 16-token pass over a filled cache and checks,
bitwise: run to run (`--runs` times), between two separate compilations, with XLA's
deterministic-ops option, a 1-token pass against row 0 of the 16-token one, each later row
against row 0 of a pass that starts at its token (at several cache lengths and token draws;
a failure names the first hidden state that differs), and the prefill run to run. Then, for each
of `--methods`, what exactness needs of the programs a user runs: a `Decoder` of plain
decoding and one of the method, each compiling its own programs, decode the same prompt, and
their prefills' keys and values, their tokens and the keys and values their passes wrote for
the tokens are compared. It prints one line per check and hashes to
compare between processes and machines. A False is a defect: of the device's kernels or the
pass in the first checks, of how separately compiled programs compute in the last (see
docs/results/h200/exactness).
"""

import functools
import hashlib

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax import engine
from clasp_jax import model as model_lib
from clasp_jax import strategies
from clasp_jax import widths
from clasp_jax.bench import decode
from clasp_jax.cache import init_cache
from clasp_jax.configs import models

_PRESET = flags.DEFINE_enum('preset', 'smollm2-135m', sorted(models.PRESETS), 'Model shape.')
_CONTEXT = flags.DEFINE_integer('context', 900, 'Tokens in the cache before the pass.')
_RUNS = flags.DEFINE_integer('runs', 40, 'Repetitions of each compiled pass.')
_ROW_CONTEXTS = flags.DEFINE_list('row_contexts', ['333', '900', '1777'], 'Cache lengths at '
                                  'which rows are checked against later passes (two token draws '
                                  'each: a defect there showed at some draws only).')
_METHODS = flags.DEFINE_list('methods', ['pld', 'static'], 'Drafting methods whose decoders '
                             'are compared with plain decoding\'s (none: skip that check).')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 32, 'Tokens each decoder of that check '
                                   'generates.')

_WIDTH = widths.DEFAULT_PASS_WIDTH


def _equal(a, b) -> bool:
  return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _digest(x) -> str:
  return hashlib.md5(np.asarray(x).tobytes()).hexdigest()[:8]


def _riders_change_nothing(params, config, tokens_T, cache) -> bool:
  """Whether riders in a pass's padding rows (`model.Ride`) leave its tokens' logits, hidden
  states and cached keys and values bit for bit as they are without them."""
  T = tokens_T.shape[0]
  riders_FD = jax.random.normal(jax.random.key(1), (_WIDTH - T, config.hidden_size),
                                jnp.bfloat16)
  attend = engine.resolve_attention('auto', config)

  def run(p, t, c, riders_FD):
    ride = None if riders_FD is None else model_lib.Ride(
        first_row=T, pos=c.length - 1, init_FD=riders_FD,
        after=lambda a, rows, x_BTD, out_BTD: (out_BTD, out_BTD[0, rows]))
    logits_TV, hiddens_LTD, c, _ = engine.full_pass(p, config, t, c, width=_WIDTH,
                                                    attention=attend, ride=ride)
    rows = slice(int(cache.length), int(cache.length) + T)
    return logits_TV, hiddens_LTD, c.k_LBSKh[:, :, rows], c.v_LBSKh[:, :, rows]

  return _equal(jax.jit(run)(params, tokens_T, cache, riders_FD),
                jax.jit(run, static_argnums=3)(params, tokens_T, cache, None))


class _KeepsLastState(engine.Decoder):
  """A decoder that keeps the state its last segment left, to read the cache it wrote."""

  def run_segment(self, state, segment, max_new_tokens):
    self.last_state, report = super().run_segment(state, segment, max_new_tokens)
    return self.last_state, report


def _decode(params, config, method: str, prompt: list[int]):
  """(tokens, keys_LSKh, values_LSKh): a fresh decoder's greedy tokens after `prompt`, and the
  keys and values its passes wrote for the prompt and every token but the last."""
  decoder = _KeepsLastState(params, config, strategies.build(method, config))
  tokens = decoder.generate(prompt, _NEW_TOKENS.value).token_ids
  cache = decoder.last_state.cache
  end = len(prompt) + len(tokens) - 1
  return (tokens, np.asarray(cache.k_LBSKh[:, 0, :end]), np.asarray(cache.v_LBSKh[:, 0, :end]))


def check_programs(params, config, methods: list[str]) -> None:
  """Plain decoding's decoder against each method's, bitwise (see the module docstring)."""
  prompt = np.random.RandomState(2).randint(0, config.vocab_size, 100).tolist()
  n = len(prompt)
  plain_tokens, plain_k, plain_v = _decode(params, config, 'vanilla', prompt)
  print(f'vanilla: tokens md5 {_digest(plain_tokens)}, prefill keys md5 {_digest(plain_k[:, :n])}',
        flush=True)
  for method in methods:
    tokens, k, v = _decode(params, config, method, prompt)
    same = 0  # tokens in common before the first difference
    while same < min(len(tokens), len(plain_tokens)) and tokens[same] == plain_tokens[same]:
      same += 1
    end = n + max(same - 1, 0)
    prefill_same = _equal((k[:, :n], v[:, :n]), (plain_k[:, :n], plain_v[:, :n]))
    passes_same = _equal((k[:, n:end], v[:, n:end]), (plain_k[:, n:end], plain_v[:, n:end]))
    print(f'{method} vs vanilla: prefill keys and values identical {prefill_same}; tokens '
          f'identical {tokens == plain_tokens} ({same} of {len(plain_tokens)} before the first '
          f'difference); keys and values of those tokens identical {passes_same}', flush=True)


def _rows_against_later_passes(params, config, tokens_W, cache, attend) -> list[str]:
  """Where row j > 0 of a pass differs from row 0 of the pass that starts at row j's token
  (over the keys and values the first wrote): a verified draft's logits that are not a plain
  step's. One 'j<j>:h<l>' per such row, l the first hidden state that differs (0: the
  embeddings, L: the last layer's output), or 'j<j>:logits' when only the logits do."""
  width = tokens_W.shape[0]
  full = jax.jit(functools.partial(engine.full_pass, config=config, width=width,
                                   attention=attend))
  logits_WV, hiddens_LWD, written, _ = full(params, tokens_T=tokens_W, cache=cache)
  found = []
  for j in range(1, width):
    shifted_W = jnp.zeros_like(tokens_W).at[:width - j].set(tokens_W[j:])
    logits_WV2, hiddens_LWD2, _, _ = full(params, tokens_T=shifted_W,
                                       cache=written.rollback(cache.length + j))
    layers = [l for l in range(hiddens_LWD.shape[0])
              if not jnp.array_equal(hiddens_LWD2[l, 0], hiddens_LWD[l, j])]
    if layers:
      found.append(f'j{j}:h{layers[0]}')
    elif not jnp.array_equal(logits_WV2[0], logits_WV[j]):
      found.append(f'j{j}:logits')
  return found


def _empty_cache(config, context: int):
  """A bfloat16 cache with room for `context` tokens and a pass."""
  return init_cache(config, engine.cache_bucket(context, _WIDTH, _WIDTH), dtype=jnp.bfloat16)


def _random_cache(config, context: int):
  """A cache of random keys and values, `context` tokens long."""
  empty = _empty_cache(config, context)
  return empty.replace(
      k_LBSKh=jax.random.normal(jax.random.key(1), empty.k_LBSKh.shape, jnp.bfloat16),
      v_LBSKh=jax.random.normal(jax.random.key(2), empty.v_LBSKh.shape, jnp.bfloat16),
      length=jnp.int32(context))


def _random_tokens(config, seed: int):
  return jnp.asarray(np.random.RandomState(seed).randint(0, config.vocab_size, _WIDTH),
                     jnp.int32)


def main(argv):
  del argv
  config = models.PRESETS[_PRESET.value]()
  limit = config.max_position_embeddings - 2 * _WIDTH
  if not all(c.isdigit() for c in _ROW_CONTEXTS.value):
    raise app.UsageError(f'--row_contexts must be whole numbers, got {_ROW_CONTEXTS.value}')
  row_contexts = [int(c) for c in _ROW_CONTEXTS.value]
  for name, value in [('context', _CONTEXT.value)] + [('row_contexts', c) for c in row_contexts]:
    if not 0 < value <= limit:
      raise app.UsageError(f'--{name} must be in [1, {limit}], got {value}')
  random = decode.random_params(config, jax.random.key(0), 'bfloat16')
  params = engine.Decoder(random, config, strategies.build('vanilla', config)).params
  attend = engine.resolve_attention('auto', config)
  cache = _random_cache(config, _CONTEXT.value)
  tokens_W = _random_tokens(config, 0)

  def one_pass(p, t, c):
    logits_TV, hiddens_LTD, _, _ = engine.full_pass(p, config, t, c, width=_WIDTH,
                                                    attention=attend)
    return logits_TV, hiddens_LTD

  first = {}
  variants = [('compiled once', one_pass, None), ('compiled again', lambda *a: one_pass(*a), None),
              ('deterministic ops', one_pass, {'xla_gpu_deterministic_ops': True})]
  for name, fn, options in variants:
    compiled = jax.jit(fn).lower(params, tokens_W, cache).compile(compiler_options=options)
    outs = [compiled(params, tokens_W, cache) for _ in range(_RUNS.value)]
    first[name] = outs[0]
    digest = _digest(outs[0][0])
    print(f'{name}: run to run identical {all(_equal(o, outs[0]) for o in outs)}, '
          f'logits md5 {digest}', flush=True)
  for name, _, _ in variants[1:]:
    print(f'{name} == compiled once: {_equal(first[name], first["compiled once"])}')
  row0 = jax.jit(one_pass)(params, tokens_W[:1], cache)[0][0]
  print(f'1-token pass == row 0 of the 16-token pass: '
        f'{bool(jnp.array_equal(row0, first["compiled once"][0][0]))}')
  print(f'a 9-token pass carrying {_WIDTH - 9} riders (the CLaSp DP in a verify pass) == the '
        f'same pass without them: {_riders_change_nothing(params, config, tokens_W[:9], cache)}')
  print(f'row j of the {_WIDTH}-token pass == row 0 of the pass that starts at its token, over '
        f'the keys and values the first wrote (a plain step after j accepted drafts), j = 1..'
        f'{_WIDTH - 1}:')
  for context in row_contexts:
    for seed in range(2):
      found = _rows_against_later_passes(params, config, _random_tokens(config, seed),
                                         _random_cache(config, context), attend)
      print(f'  context {context}, tokens {seed}: {not found}'
            + (f' (first differing hidden state per row: {" ".join(found)})' if found else ''),
            flush=True)
  prompt_BP = jnp.asarray(np.random.RandomState(1).randint(0, config.vocab_size, (1, 512)),
                          jnp.int32)
  prefill = jax.jit(lambda p, t, c: model_lib.forward(p, config, t, c, attention=attend).logits_BPV)
  empty = _empty_cache(config, _CONTEXT.value)
  outs = [prefill(params, prompt_BP, empty) for _ in range(_RUNS.value // 2)]
  print(f'prefill (512 tokens) run to run identical: {all(_equal(o, outs[0]) for o in outs)}')
  methods = [m for m in _METHODS.value if m]
  if methods:
    check_programs(random, config, methods)


if __name__ == '__main__':
  app.run(main)
