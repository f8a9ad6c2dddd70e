"""CPU check of packed_qkv.py (Pallas interpret mode, float32, the tiny test model): the packed
kernel against the library's on one chunk, and the patched layer against `model.decoder_layer`.

  python docs/results/h200/decode/packed_qkv/cpu_check.py   # from the repository root
"""
import os, sys, tempfile
os.environ['OUT'] = tempfile.mkdtemp()  # packed_qkv.py writes its (empty) results there
os.environ['PRESETS'] = ''  # packed_qkv.py's functions only, no run
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), 'tests']
import numpy as np
import jax.numpy as jnp
import packed_qkv as pq
from clasp_jax import attention_pallas as ap
from clasp_jax import model as model_lib
import tiny

config = tiny.tiny_config()
rng = np.random.default_rng(0)
T, S, start = 16, 256, 130
H, KV, hd = config.num_heads, config.num_kv_heads, config.head_dim
qkv = jnp.asarray(rng.standard_normal((1, T, H + 2 * KV, hd)), jnp.float32)
ck, cv = (jnp.asarray(rng.standard_normal((2, 1, S, KV, hd)), jnp.float32) for _ in range(2))


def library(q, k, v):
  return ap.cache_attention_pallas(q, k, v, ck, cv, 1, start, interpret=True)


def packed(q, k, v):
  return pq.packed_attention(q, ck, cv, 1, start, num_heads=H)


print('attention bit-equal:', np.array_equal(
    packed(qkv, None, None), library(qkv[:, :, :H], qkv[:, :, H:H + KV], qkv[:, :, H + KV:])))
lp = model_lib.unstack_layers(tiny.tiny_params(config))['layers'][0]
x = jnp.asarray(rng.standard_normal((1, T, config.hidden_size)), jnp.float32)
cos, sin = model_lib.rope_tables(config, jnp.arange(T)[None] + start)
for name, a, b in zip(('output', 'k', 'v'), model_lib.decoder_layer(lp, config, x, cos, sin, library),
                      pq.packed_layer(lp, config, x, cos, sin, packed)):
  print(f'layer {name} bit-equal:', np.array_equal(a, b))
