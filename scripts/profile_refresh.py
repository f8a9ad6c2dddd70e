"""Where a CLaSp round's skip-set refresh spends its time, piece by piece, on random weights
of preset shapes (what `bench_decode.py --what=refresh` measures as a whole).

  python scripts/profile_refresh.py --presets=smollm2-135m,llama3-8b

CLaSp at M = L/2 with layer-skip drafts only, K = 8 and DET 0, after a prefill of `--context`
random tokens. Each piece is a call of its own, timed on the host from dispatch to completion
(the median of `--reps`, after an untimed one), so each includes its own dispatch and
read-back:

  dp_table        the DP's choice table (a pseudo-token pass through every layer), with the
                  fused prefix attention and with the plain jnp one
  backtrack       reading a skip set of M layers back from the table
  refresh         a refresh by the DP of its own: the DP in one call, its skip set read back,
                  then put in force (the active layers picked on the host)
  segment_1       one drafting round run as a segment of its own, its report read back
  segment_8       the same, per round of an 8-round segment
  plain_16        a plain step, per round of a 16-round plain segment

segment_1 less segment_8 is what a segment costs beyond its rounds.

Then, through `Decoder.generate` (ms per round: the difference of `--long` and `--short`
generations over the difference of their rounds, the median of `--generate_reps`, the two
decoders in turns within each repetition):

  generate_static   drafting with a fixed skip set of M layers (one segment)
  generate_clasp    CLaSp at LOI 1 with the DP in the verify passes: the device checks
                    each table and returns to the host only when the skip set changes

generate_clasp less generate_static is what refreshing costs a round, DP included.
"""

import functools
import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax import engine
from clasp_jax import strategies
from clasp_jax.bench import decode
from clasp_jax.configs import models
from clasp_jax.strategies import clasp

_PRESETS = flags.DEFINE_list('presets', ['smollm2-135m', 'llama3-8b'], 'Model shapes.')
_CONTEXT = flags.DEFINE_integer('context', 860, 'Prompt tokens before the timed pieces.')
_REPS = flags.DEFINE_integer('reps', 15, 'Timed calls per piece (median).')
_GENERATE_REPS = flags.DEFINE_integer('generate_reps', 5, 'Repetitions of the generations.')
_SHORT = flags.DEFINE_integer('short', 32, 'New tokens of the short generation.')
_LONG = flags.DEFINE_integer('long', 160, 'New tokens of the long generation.')
_OUT = flags.DEFINE_string('out', '', 'Write the rows as JSON here.')

_MAX_NEW_TOKENS = 256  # the token budget the state is prefilled for and segments run under


def _median_ms(fn, reps: int, prepare=lambda: ()) -> float:
  """Median milliseconds of `fn(*prepare())` to completion; `prepare` runs untimed."""
  jax.block_until_ready(fn(*prepare()))
  seconds = []
  for _ in range(reps):
    args = jax.block_until_ready(prepare())
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    seconds.append(time.perf_counter() - start)
  return 1e3 * sorted(seconds)[reps // 2]


def profile(preset: str, context: int, reps: int) -> dict:
  """The pieces' milliseconds for one preset."""
  config = models.PRESETS[preset]()
  params = decode.random_params(config, jax.random.key(0), 'bfloat16')
  M = config.num_layers // 2
  decoder = engine.Decoder(params, config, decode.case_strategy('refresh', config))
  prompt = np.random.RandomState(0).randint(0, config.vocab_size, context).tolist()
  state = decoder.refresh(decoder.start(prompt, _MAX_NEW_TOKENS), M)
  copy = lambda: (jax.tree.map(jnp.copy, state),)  # a segment consumes (donates) its state
  row = dict(preset=preset, context=context, num_skip=M, device_kind=jax.devices()[0].device_kind,
             jax_version=jax.__version__)
  for name in ('pallas', 'xla') if jax.default_backend() == 'gpu' else ('xla',):
    table = jax.jit(functools.partial(
        clasp.clasp_dp_table, config=config, max_skip=M,
        attention=engine.resolve_attention(name, config, prefix=True)))
    row[f'dp_table_{name}'] = _median_ms(
        lambda: table(decoder.params, cache=state.cache, hidden_LD=state.target_hidden_LD), reps)
  choice_LJ = table(decoder.params, cache=state.cache, hidden_LD=state.target_hidden_LD)
  backtrack = jax.jit(clasp.backtrack)
  row['backtrack'] = _median_ms(lambda: backtrack(choice_LJ, M), reps)
  row['refresh'] = _median_ms(
      lambda s: decoder.put_skip_set(s, decoder.choose_skip_set(s, M)).skip_L, reps, copy)

  def segment(state, draft, rounds):
    _, report = decoder.run_segment(state, strategies.Segment(draft=draft, rounds=rounds),
                                    _MAX_NEW_TOKENS)
    return jax.device_get(report)

  row['segment_1'] = _median_ms(lambda s: segment(s, True, 1), reps, copy)
  row['segment_8'] = _median_ms(lambda s: segment(s, True, 8), reps, copy) / 8
  row['plain_16'] = _median_ms(lambda s: segment(s, False, 16), reps, copy) / 16
  row.update(_through_generate(decoder.params, config, prompt))
  return row


def _through_generate(params, config, prompt: list[int]) -> dict:
  """ms per round of static drafting and of CLaSp through `Decoder.generate`, interleaved
  (see the module docstring): `bench_decode.py`'s draft and refresh cases."""
  decoders = {name: engine.Decoder(params, config, decode.case_strategy(what, config))
              for name, what in (('static', 'draft'), ('clasp', 'refresh'))}
  for decoder in decoders.values():  # compiles, and loads each program's kernels
    decoder.generate(prompt, _SHORT.value)
    decoder.generate(prompt, _LONG.value)
  per_round = {name: [] for name in decoders}
  for _ in range(_GENERATE_REPS.value):
    for name, decoder in decoders.items():
      short = decoder.generate(prompt, _SHORT.value)
      long = decoder.generate(prompt, _LONG.value)
      rounds = len(long.accept_lengths) - len(short.accept_lengths)
      per_round[name].append((long.wall_time - short.wall_time) / rounds)
  return {f'generate_{name}': 1e3 * float(np.median(seconds))
          for name, seconds in per_round.items()}


def main(argv):
  del argv
  unknown = set(_PRESETS.value) - set(models.PRESETS)
  if unknown:
    raise app.UsageError(f'unknown presets {sorted(unknown)}; known: {sorted(models.PRESETS)}')
  rows = []
  for preset in _PRESETS.value:
    rows.append({k: round(v, 3) if isinstance(v, float) else v
                 for k, v in profile(preset, _CONTEXT.value, _REPS.value).items()})
    print(json.dumps(rows[-1]), flush=True)
    if _OUT.value:  # after every preset: a run cut short keeps what it measured
      with open(_OUT.value, 'w') as f:
        json.dump(rows, f, indent=1)


if __name__ == '__main__':
  app.run(main)
