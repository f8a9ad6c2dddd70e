r"""Plain decoding at pass widths 1 to 16, and static drafting (M = L/2, K = 8, DET 0) at 9
and 16, on one GPU: random bf16 weights of each preset, 1024 tokens of context.

  python docs/results/h100/pass_width/widths_gpu.py smollm2-135m,llama3-8b

A decoder's ms a token (a round, for drafting) is the difference of 160- and 32-token
generations over their 128 tokens, the median of 5; the decoders of a preset take turns. It
shows what the width costs a plain step (every full pass of a decoder has `pass_width` rows;
`widths.DEFAULT_PASS_WIDTH` is 16), not tokens or their acceptance.
"""
import json, sys
import numpy as np, jax, jax.numpy as jnp
from clasp_jax import engine, strategies
from clasp_jax.bench import decode as bench_decode
from clasp_jax.configs import models
SHORT, LONG, REPS, CONTEXT = 32, 160, 5, 1024
for preset in sys.argv[1].split(','):
  config = models.PRESETS[preset]()
  params = bench_decode.random_params(config, jax.random.key(0), jnp.bfloat16)
  L = config.num_layers
  cases = [('plain', w) for w in (1, 2, 4, 9, 16)] + [('draft', w) for w in (9, 16)]
  prompt = np.random.RandomState(0).randint(0, config.vocab_size, CONTEXT - LONG).tolist()
  decoders = []
  for what, width in cases:
    strategy = (strategies.build('vanilla', config) if what == 'plain' else
                strategies.build('static', config, skip_set=tuple(range(1, L, 2))[:L // 2],
                                 num_draft_tokens=8, draft_exit_threshold=0.0))
    decoder = engine.Decoder(params, config, strategy, pass_width=width)
    for n in (SHORT, LONG):
      decoder.generate(prompt, n)  # compiles
    decoders.append(decoder)
  timed = [{SHORT: [], LONG: []} for _ in decoders]
  for _ in range(REPS):
    for decoder, by_length in zip(decoders, timed):
      for n in (SHORT, LONG):
        by_length[n].append(bench_decode._timed(decoder, prompt, n))
  for (what, width), by_length in zip(cases, timed):
    (t_s, n_s, r_s, _), (t_l, n_l, r_l, _) = (sorted(by_length[n])[REPS // 2] for n in (SHORT, LONG))
    print(json.dumps(dict(preset=preset, what=what, width=width,
                          ms_per_token=1e3 * (t_l - t_s) / (n_l - n_s),
                          ms_per_round=1e3 * (t_l - t_s) / max(r_l - r_s, 1))), flush=True)
  del decoders, params
print(jax.devices()[0].device_kind, 'jax', jax.__version__)
