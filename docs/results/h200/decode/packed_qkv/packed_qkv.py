"""Experiment: q, k and v out of one kernel. Plain decoding through `Decoder.generate`, the
library's layer against a patched one, side by side in one process.

The library's layer hands the attention three arrays, q, k and v, each made by its own kernel
from the q/k/v product's partial sums (`products/layer_map/`). The patched layer ropes q and k
and passes v through in one expression whose output is one array [B, T, H + 2 KV, hd] (a
`where` on the head index), puts it through the optimization barrier the library puts k and v
through, and hands that one array to a copy of the library's Pallas kernel that reads q, k and
v from it (its rows t * N + h, N = H + 2 KV; the library's kernel reads three arrays of rows
t * H + h and t * KV + k). The cache write takes k and v as slices of it, as before after the
layer loop. Single device, fused q/k/v (the GPU default). Nothing here changes the library.

  OUT=<folder> PRESETS=smollm2-135m,llama3-8b python packed_qkv.py

Prints and writes packed_qkv.json: per preset, ms per token of 128-token generations (median
of REPS, the two decoders in turns), the GPU kernels per token and their busy time (one traced
48-token generation each, less a 1-token one), and whether the two gave the same tokens.
"""
import collections, functools, glob, gzip, json, math, os, tempfile
import numpy as np
import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from clasp_jax import attention as attention_lib
from clasp_jax import attention_pallas as ap
from clasp_jax import model as model_lib
from clasp_jax import strategies
from clasp_jax.bench import planted
from clasp_jax.configs import models
from clasp_jax.engine import Decoder

OUT = os.environ['OUT']
REPS = int(os.environ.get('REPS', 5))
NEW = 128


def _packed_kernel(start_ref, layer_ref, qkv_ref, cache_k_ref, cache_v_ref, m_ref, l_ref,
                   o_ref, *, num_tokens, group, num_heads, split):
  """`ap._split_kernel` (own keys on), reading q, k and v from one packed array of rows
  t * N + head: q heads from 0, k heads from H, v heads from H + KV."""
  kv = pl.program_id(0)
  row_block = pl.program_id(1)
  split_start = pl.program_id(2) * split
  start = start_ref[()]
  layer = layer_ref[()]
  R, hd = o_ref.shape
  num_kv = cache_k_ref.shape[2]
  stride = num_heads + 2 * num_kv
  hd_h = jnp.arange(hd, dtype=jnp.int32)
  x_R = row_block * R + jnp.arange(R, dtype=jnp.int32)
  q_row_R = lax.div(x_R, group) * stride + kv * group + lax.rem(x_R, group)
  real_R = x_R < num_tokens * group
  q_Rh = plgpu.load(qkv_ref.at[jnp.where(real_R, q_row_R, 0)[:, None], hd_h[None, :]],
                    mask=jnp.broadcast_to(real_R[:, None], (R, hd)), other=0)
  last_R = start + lax.div(x_R, group)
  end = start + num_tokens
  span = jnp.minimum(jnp.maximum(end - split_start, 0), split)
  num_blocks = lax.div(span + ap.KEY_BLOCK - 1, ap.KEY_BLOCK)
  num_cached = jnp.minimum(lax.div(jnp.maximum(start - split_start, 0), ap.KEY_BLOCK),
                           num_blocks)

  def cached(cache_ref, first_head, block_start, pos_C):
    del first_head, pos_C
    return plgpu.load(cache_ref.at[layer, pl.ds(block_start, ap.KEY_BLOCK), kv, :])

  def merged(cache_ref, first_head, block_start, pos_C):
    shape = (ap.KEY_BLOCK, hd)
    cached_Ch = plgpu.load(cache_ref.at[layer, pl.ds(block_start, ap.KEY_BLOCK), kv, :],
                           mask=jnp.broadcast_to((pos_C < start)[:, None], shape), other=0)
    row_C = pos_C - start
    in_chunk_C = (row_C >= 0) & (row_C < num_tokens)
    chunk_row_C = jnp.clip(row_C, 0, num_tokens - 1) * stride + first_head + kv
    chunk_Ch = plgpu.load(qkv_ref.at[chunk_row_C[:, None], hd_h[None, :]],
                          mask=jnp.broadcast_to(in_chunk_C[:, None], shape), other=0)
    return jnp.where(in_chunk_C[:, None], chunk_Ch, cached_Ch)

  def block(b, carry, keys):
    m_R, l_R, o_Rh = carry
    block_start = split_start + b * ap.KEY_BLOCK
    pos_C = block_start + jnp.arange(ap.KEY_BLOCK, dtype=jnp.int32)
    k_Ch = keys(cache_k_ref, num_heads, block_start, pos_C)
    v_Ch = keys(cache_v_ref, num_heads + num_kv, block_start, pos_C)
    visible_RC = pos_C[None, :] <= last_R[:, None]
    s_RC = lax.dot_general(q_Rh, k_Ch, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32) / math.sqrt(hd)
    s_RC = jnp.where(visible_RC, s_RC, -jnp.inf)
    m_new_R = jnp.maximum(m_R, jnp.max(s_RC, axis=1))
    alpha_R = jnp.where(m_new_R == m_R, 1.0, jnp.exp(m_R - m_new_R))
    p_RC = jnp.where(visible_RC, jnp.exp(s_RC - m_new_R[:, None]), 0.0)
    l_R = l_R * alpha_R + jnp.sum(p_RC, axis=1)
    pv_Rh = lax.dot_general(p_RC.astype(v_Ch.dtype), v_Ch, (((1,), (0,)), ((), ())),
                            precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return m_new_R, l_R, o_Rh * alpha_R[:, None] + pv_Rh

  init = (jnp.full((R,), -jnp.inf, jnp.float32), jnp.zeros((R,), jnp.float32),
          jnp.zeros((R, hd), jnp.float32))
  carry = lax.fori_loop(0, num_cached, functools.partial(block, keys=cached), init)
  m_R, l_R, o_Rh = lax.fori_loop(num_cached, num_blocks, functools.partial(block, keys=merged),
                                 carry)
  m_ref[...] = m_R
  l_ref[...] = l_R
  o_ref[...] = o_Rh


@functools.partial(jax.jit, static_argnames=('num_heads',), inline=True)
def packed_attention(qkv_BTNh, cache_k_LBSKh, cache_v_LBSKh, layer, start, *, num_heads):
  """`ap.cache_attention_pallas` on a packed [1, T, H + 2 KV, hd] array."""
  B, T, N, hd = qkv_BTNh.shape
  L, _, S, KV, _ = cache_k_LBSKh.shape
  G = num_heads // KV
  split = ap.split_size(KV)
  rows = min(ap.MAX_ROW_BLOCK, max(16, pl.next_power_of_2(T * G)))
  num_row_blocks, num_splits = pl.cdiv(T * G, rows), pl.cdiv(S, split)
  X = num_row_blocks * rows
  scalar_spec = pl.BlockSpec((), lambda k, r, p: ())
  stat_spec = pl.BlockSpec((None, None, rows), lambda k, r, p: (p, k, r))
  m_PKX, l_PKX, o_PKXh = pl.pallas_call(
      functools.partial(_packed_kernel, num_tokens=T, group=G, num_heads=num_heads,
                        split=split),
      grid=(KV, num_row_blocks, num_splits),
      in_specs=[scalar_spec, scalar_spec, pl.BlockSpec((T * N, hd), lambda k, r, p: (0, 0)),
                pl.BlockSpec((L, None, S, KV, hd), lambda k, r, p: (0, 0, 0, 0, 0)),
                pl.BlockSpec((L, None, S, KV, hd), lambda k, r, p: (0, 0, 0, 0, 0))],
      out_specs=[stat_spec, stat_spec,
                 pl.BlockSpec((None, None, rows, hd), lambda k, r, p: (p, k, r, 0))],
      out_shape=[jax.ShapeDtypeStruct((num_splits, KV, X), jnp.float32),
                 jax.ShapeDtypeStruct((num_splits, KV, X), jnp.float32),
                 jax.ShapeDtypeStruct((num_splits, KV, X, hd), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=ap.NUM_WARPS, num_stages=ap.NUM_STAGES),
      name='cache_attention_packed',
      interpret=jax.default_backend() == 'cpu',  # a CPU check of the script
  )(jnp.asarray(start, jnp.int32), jnp.asarray(layer, jnp.int32),
    qkv_BTNh[0].reshape(T * N, hd), cache_k_LBSKh, cache_v_LBSKh)
  _, l_KX, o_KXh = ap._fold(m_PKX, l_PKX, o_PKXh)
  return ap._normalise(l_KX, o_KXh, B, T, num_heads, qkv_BTNh.dtype)


def packed_layer(lp, config, x_BTD, cos_BTh, sin_BTh, attend):
  """`model.decoder_layer` with q, k and v made as one array and attended to as one."""
  B, T, _ = x_BTD.shape
  H, KV, hd = config.num_heads, config.num_kv_heads, config.head_dim
  h_BTD = model_lib.rms_norm(x_BTD, lp['attn_norm'], config.rms_norm_eps)
  qkv_BTNh = model_lib._fused_matmul(h_BTD, lp['w_qkv']).reshape(B, T, H + 2 * KV, hd)
  x32 = qkv_BTNh.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  roped = x32 * cos_BTh[:, :, None] + jnp.concatenate([-x2, x1], axis=-1) * sin_BTh[:, :, None]
  ropes_N = jnp.arange(H + 2 * KV) < H + KV  # q and k heads; v heads pass through
  qkv_BTNh = lax.optimization_barrier(
      jnp.where(ropes_N[:, None], roped, x32).astype(qkv_BTNh.dtype))
  attn_BTq = lax.optimization_barrier(attend(qkv_BTNh, None, None))
  k_BTKh, v_BTKh = qkv_BTNh[:, :, H:H + KV], qkv_BTNh[:, :, H + KV:]
  return model_lib._finish_layer(lp, config, x_BTD, attn_BTq), k_BTKh, v_BTKh


def decoder(params, config, packed):
  """A plain-decoding decoder, its programs compiled with the library's layer or the packed."""
  library = model_lib.decoder_layer, ap.cache_attention_pallas, attention_lib.cache_attention
  H, KV = config.num_heads, config.num_kv_heads

  def kernel(q, k, v, cache_k, cache_v, layer, start):
    if k is None:
      return packed_attention(q, cache_k, cache_v, layer, start, num_heads=H)
    return library[1](q, k, v, cache_k, cache_v, layer, start)

  def reference(q, k, v, cache_k, cache_v, layer, start):  # the prefill's: slices
    if k is None:
      q, k, v = q[:, :, :H], q[:, :, H:H + KV], q[:, :, H + KV:]
    return library[2](q, k, v, cache_k, cache_v, layer, start)

  if packed:
    model_lib.decoder_layer, ap.cache_attention_pallas = packed_layer, kernel
    attention_lib.cache_attention = reference
  try:
    d = Decoder(params, config, strategies.Vanilla(), attention='pallas')
    d.generate(PROMPT, NEW)  # compiles (with the patch in force for the packed one)
    d.generate(PROMPT, 1)
  finally:
    model_lib.decoder_layer, ap.cache_attention_pallas, attention_lib.cache_attention = library
  return d


def kernels(d, new):
  """(busy microseconds, kernel count) of one traced generation of `new` tokens."""
  folder = tempfile.mkdtemp()
  with jax.profiler.trace(folder, create_perfetto_trace=True):
    d.generate(PROMPT, new)
  (path,) = glob.glob(f'{folder}/**/*perfetto_trace.json.gz', recursive=True)
  ev = json.load(gzip.open(path))['traceEvents']
  names = {e['pid']: e['args']['name'] for e in ev
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  gpu = [e for e in ev if e.get('ph') == 'X' and 'GPU' in names.get(e['pid'], '')]
  return sum(e['dur'] for e in gpu), len(gpu)


results = {}
for preset in filter(None, os.environ.get('PRESETS', 'smollm2-135m,llama3-8b').split(',')):
  config = models.PRESETS[preset]()
  params = planted.build_params(planted.planted_model(config, epsilon=0.02), 'bfloat16',
                                per_layer=True)
  PROMPT = np.random.RandomState(0).randint(10, config.vocab_size, 860).tolist()
  decoders = {'library': decoder(params, config, False), 'packed': decoder(params, config, True)}
  tokens = {name: d.generate(PROMPT, NEW).token_ids for name, d in decoders.items()}
  ms = collections.defaultdict(list)
  for _ in range(REPS):
    for name, d in decoders.items():
      ms[name].append(1e3 * d.generate(PROMPT, NEW).wall_time / NEW)
  row = {'same_tokens': tokens['library'] == tokens['packed']}
  for name, d in decoders.items():
    (busy_l, n_l), (busy_s, n_s) = kernels(d, 48), kernels(d, 1)
    row[name] = dict(ms_per_token=float(np.median(ms[name])), ms_runs=ms[name],
                     busy_ms_per_token=(busy_l - busy_s) / 1e3 / 47,
                     kernels_per_token=(n_l - n_s) / 47)
  row['packed_over_library'] = row['library']['ms_per_token'] / row['packed']['ms_per_token']
  results[preset] = row
  print(preset, json.dumps(row), flush=True)
  del decoders, params
results['jax'] = jax.__version__
json.dump(results, open(f'{OUT}/packed_qkv.json', 'w'), indent=1)
