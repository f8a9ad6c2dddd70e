"""Is the full-model pass bit for bit reproducible on this device? Random weights of a preset.

  python scripts/check_determinism.py --preset=smollm2-135m

The engine's exactness rests on one token's logits coming out of every full pass bit for bit
the same (`engine.full_pass`). This runs one 16-token pass over a filled cache and checks,
bitwise: run to run (`--runs` times), between two separate compilations, with XLA's
deterministic-ops option, a 1-token pass against row 0 of the 16-token one, and the prefill
run to run. It prints one line per check and a hash of
the logits, to compare between processes and machines. A False here is a defect of the
device's kernels or of the pass; all True does not show that separately compiled programs
pick the same kernels (see docs/results/h200/exactness).
"""

import hashlib

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax import engine
from clasp_jax import model as model_lib
from clasp_jax import strategies
from clasp_jax.bench import decode
from clasp_jax.cache import init_cache
from clasp_jax.configs import models

_PRESET = flags.DEFINE_enum('preset', 'smollm2-135m', sorted(models.PRESETS), 'Model shape.')
_CONTEXT = flags.DEFINE_integer('context', 900, 'Tokens in the cache before the pass.')
_RUNS = flags.DEFINE_integer('runs', 40, 'Repetitions of each compiled pass.')

_WIDTH = engine.DEFAULT_PASS_WIDTH


def _equal(a, b) -> bool:
  return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(argv):
  del argv
  config = models.PRESETS[_PRESET.value]()
  if not 0 < _CONTEXT.value <= config.max_position_embeddings - _WIDTH:
    raise app.UsageError(f'--context must be in [1, {config.max_position_embeddings - _WIDTH}]')
  random = decode.random_params(config, jax.random.key(0), 'bfloat16')
  params = engine.Decoder(random, config, strategies.build('vanilla', config)).params
  attend = engine.resolve_attention('auto', config)
  capacity = engine.cache_bucket(_CONTEXT.value, _WIDTH, _WIDTH)
  empty = init_cache(config, capacity, dtype=jnp.bfloat16)
  cache = empty.replace(
      k_LBSKh=jax.random.normal(jax.random.key(1), empty.k_LBSKh.shape, jnp.bfloat16),
      v_LBSKh=jax.random.normal(jax.random.key(2), empty.v_LBSKh.shape, jnp.bfloat16),
      length=jnp.int32(_CONTEXT.value))
  tokens_W = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, _WIDTH),
                         jnp.int32)

  def one_pass(p, t, c):
    logits_TV, hiddens_LTD, _ = engine.full_pass(p, config, t, c, width=_WIDTH, attention=attend)
    return logits_TV, hiddens_LTD

  first = {}
  variants = [('compiled once', one_pass, None), ('compiled again', lambda *a: one_pass(*a), None),
              ('deterministic ops', one_pass, {'xla_gpu_deterministic_ops': True})]
  for name, fn, options in variants:
    compiled = jax.jit(fn).lower(params, tokens_W, cache).compile(compiler_options=options)
    outs = [compiled(params, tokens_W, cache) for _ in range(_RUNS.value)]
    first[name] = outs[0]
    digest = hashlib.md5(np.asarray(outs[0][0]).tobytes()).hexdigest()[:8]
    print(f'{name}: run to run identical {all(_equal(o, outs[0]) for o in outs)}, '
          f'logits md5 {digest}', flush=True)
  for name, _, _ in variants[1:]:
    print(f'{name} == compiled once: {_equal(first[name], first["compiled once"])}')
  row0 = jax.jit(one_pass)(params, tokens_W[:1], cache)[0][0]
  print(f'1-token pass == row 0 of the 16-token pass: '
        f'{bool(jnp.array_equal(row0, first["compiled once"][0][0]))}')
  prompt_BP = jnp.asarray(np.random.RandomState(1).randint(0, config.vocab_size, (1, 512)),
                          jnp.int32)
  prefill = jax.jit(lambda p, t, c: model_lib.forward(p, config, t, c, attention=attend).logits_BPV)
  outs = [prefill(params, prompt_BP, empty) for _ in range(_RUNS.value // 2)]
  print(f'prefill (512 tokens) run to run identical: {all(_equal(o, outs[0]) for o in outs)}')


if __name__ == '__main__':
  app.run(main)
