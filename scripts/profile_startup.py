"""Seconds a process spends building the programs of the default method before it can decode:
tracing and lowering, program by program, lowered for a GPU from any machine.

  python scripts/profile_startup.py --presets=smollm2-135m,llama3.2-1b

A second process with a warm `--cache_dir` loads its compiled programs from JAX's persistent
cache, but JAX traces and lowers each program first to find it there, so those seconds are
paid by every process. On the accelerator path the layers are unrolled and each calls the
fused attention kernel; this script builds the programs of `Decoder.compile` for a request
(random weights of a preset's shape, bf16, the default method) twice, side by side: with the
kernel as the library has it (traced once per program, `attention_pallas`), and with the
kernel traced at every layer that calls it (how it was before), and says whether the two
builds lowered to the same text.
"""

import time

from absl import app
from absl import flags
import jax

from clasp_jax import attention_pallas
from clasp_jax import engine
from clasp_jax import strategies
from clasp_jax.bench import decode
from clasp_jax.configs import models

_PRESETS = flags.DEFINE_list('presets', ['smollm2-135m', 'llama3.2-1b'], 'Model shapes.')
_PLATFORM = flags.DEFINE_string('platform', 'cuda', 'What to lower for.')
_PROMPT_TOKENS = flags.DEFINE_integer('prompt_tokens', 36, 'The request: prompt tokens.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 256, 'The request: new tokens.')

_KERNELS = ('cache_attention_pallas', 'prefix_attention_pallas')


def build(config, params, kernel: str) -> tuple[float, dict[str, str]]:
  """(seconds, lowered text by program) of one build; `kernel`: 'once' or 'per layer'."""
  originals = {name: getattr(attention_pallas, name) for name in _KERNELS}
  if kernel == 'per layer':
    for name, function in originals.items():
      setattr(attention_pallas, name, function.__wrapped__)
  try:
    jax.clear_caches()
    decoder = engine.Decoder(params, config, strategies.build('clasp', config),
                             fast_path=True, attention='pallas')
    start = time.perf_counter()
    lowered = decoder.lower(_PROMPT_TOKENS.value, _MAX_NEW_TOKENS.value, _PLATFORM.value)
    seconds = time.perf_counter() - start
  finally:
    for name, function in originals.items():
      setattr(attention_pallas, name, function)
  return seconds, {name: low.as_text(debug_info=False) for name, low in lowered.items()}


def main(argv):
  del argv
  print('| preset | programs | kernel traced once: s | at every layer: s | ratio | same programs |')
  print('|---|---|---|---|---|---|')
  for preset in _PRESETS.value:
    config = models.PRESETS[preset]()
    params = decode.random_params(config, jax.random.key(0), 'bfloat16')
    once_s, once = build(config, params, 'once')
    every_s, every = build(config, params, 'per layer')
    print(f'| {preset} | {len(once)} | {once_s:.2f} | {every_s:.2f} | {every_s / once_s:.2f}x '
          f'| {once == every} |')


if __name__ == '__main__':
  app.run(main)
