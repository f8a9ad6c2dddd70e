"""Where the host's time goes in a CLaSp LOI-1 generation (8B shape, random weights)."""
import cProfile, pstats, sys, time, io
import jax, numpy as np
from clasp_jax.bench import decode
from clasp_jax.configs import models
from clasp_jax.engine import Decoder
preset = sys.argv[1] if len(sys.argv) > 1 else 'llama3-8b'
config = models.PRESETS[preset]()
params = decode.random_params(config, jax.random.key(0), 'bfloat16')
dec = Decoder(params, config, decode.case_strategy('refresh', config))
prompt = np.random.RandomState(0).randint(0, config.vocab_size, 1024 - 160).tolist()
for _ in range(2):
  g = dec.generate(prompt, 160)
print('rounds', len(g.accept_lengths), 'refreshes', len(g.refresh_times),
      'refresh host s', sum(g.refresh_times))
t = time.perf_counter(); g = dec.generate(prompt, 160); wall = time.perf_counter() - t
print('wall', wall)
pr = cProfile.Profile(); pr.enable(); dec.generate(prompt, 160); pr.disable()
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats('tottime').print_stats(25); print(s.getvalue()[:6000])
