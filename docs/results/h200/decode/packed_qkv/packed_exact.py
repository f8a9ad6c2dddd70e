"""Is the packed q/k/v layer of packed_qkv.py exact on the GPU? Random bf16 weights of a preset.

With the patch in force for the whole process: (1) after a 900-token prefill, 12 tokens each
decoded as a plain 16-row pass and as every row of passes starting at tokens 0, 3, 7 and 11;
each row's logits must equal the plain step's bit for bit (what `tests/test_exact.py` checks
of the library on the CPU); (2) plain decoding, prompt lookup and a static skip set through
`Decoder.generate`, 64 tokens: the same tokens.

  OUT=<folder> PRESETS=smollm2-135m,llama3-8b python packed_exact.py
"""
import json, os, sys
os.environ['PRESETS_OF_RUN'] = os.environ.get('PRESETS', 'smollm2-135m,llama3-8b')
os.environ['PRESETS'] = ''  # packed_qkv.py's functions only
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
import jax
import jax.numpy as jnp
import packed_qkv as pq
from clasp_jax import attention as attention_lib
from clasp_jax import attention_pallas as ap
from clasp_jax import engine
from clasp_jax import model as model_lib
from clasp_jax import strategies
from clasp_jax.bench import planted
from clasp_jax.cache import init_cache
from clasp_jax.configs import models

LIBRARY_LAYER = model_lib.decoder_layer
results = {}
for preset in os.environ['PRESETS_OF_RUN'].split(','):
  config = models.PRESETS[preset]()
  H, KV = config.num_heads, config.num_kv_heads
  library_kernel, library_reference = ap.cache_attention_pallas, attention_lib.cache_attention

  def kernel(q, k, v, cache_k, cache_v, layer, start):
    if k is None:
      return pq.packed_attention(q, cache_k, cache_v, layer, start, num_heads=H)
    return library_kernel(q, k, v, cache_k, cache_v, layer, start)

  def reference(q, k, v, cache_k, cache_v, layer, start):
    if k is None:
      q, k, v = q[:, :, :H], q[:, :, H:H + KV], q[:, :, H + KV:]
    return library_reference(q, k, v, cache_k, cache_v, layer, start)

  model_lib.decoder_layer, ap.cache_attention_pallas = pq.packed_layer, kernel
  attention_lib.cache_attention = reference
  params = planted.build_params(planted.planted_model(config, epsilon=0.02), 'bfloat16',
                                per_layer=True)
  rng = np.random.RandomState(0)
  prompt_1P = jnp.asarray(rng.randint(10, config.vocab_size, (1, 900)), jnp.int32)
  tokens_T = jnp.asarray(rng.randint(10, config.vocab_size, 12), jnp.int32)
  prefill = jax.jit(lambda p, t, c: model_lib.forward(p, config, t, c, attention=reference).cache)
  one_pass = jax.jit(lambda p, t, c: engine.full_pass(p, config, t, c, width=16, attention=kernel))
  cache = prefill(params, prompt_1P, init_cache(config, 2048, dtype=jnp.bfloat16))
  rows, plain = {}, {}
  for t in range(12):
    if t in (0, 3, 7, 11):
      logits_TV = one_pass(params, tokens_T[t:], cache)[0]
      rows.update({(t, t + r): np.asarray(logits_TV[r]) for r in range(12 - t)})
    logits_TV, _, cache, _ = one_pass(params, tokens_T[t:t + 1], cache)
    cache = cache.rollback(900 + t + 1)
    plain[t] = np.asarray(logits_TV[0])
  mismatches = [k for k, v in rows.items() if not np.array_equal(v, plain[k[1]])]
  prompt = rng.randint(10, config.vocab_size, 860).tolist()
  settings = {'vanilla': {}, 'pld': {},
              'static': dict(skip_set=tuple(range(1, config.num_layers - 1, 2)))}
  tokens = {m: engine.Decoder(params, config, strategies.build(m, config, **s), attention='pallas')
            .generate(prompt, 64).token_ids for m, s in settings.items()}
  model_lib.decoder_layer, ap.cache_attention_pallas = LIBRARY_LAYER, library_kernel
  attention_lib.cache_attention = library_reference
  results[preset] = dict(rows_checked=len(rows), rows_differing=[list(k) for k in mismatches],
                         identical_to_vanilla={m: tokens[m] == tokens['vanilla'] for m in tokens})
  print(preset, json.dumps(results[preset]), flush=True)
  del params
results['jax'] = jax.__version__
json.dump(results, open(f'{os.environ["OUT"]}/packed_exact.json', 'w'), indent=1)
