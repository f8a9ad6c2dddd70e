"""Cost of each piece of a CLaSp round on the current device, on random weights of a preset.

For every preset shape and context it times (median of repeated, synchronised calls after a
warm-up): the full decode step and its fraction of the weight-bytes roofline; the draft step
over the L - M active layers alone for several M, beside (L - M) / L; the same draft
through the per-layer `lax.cond` reference path; verify passes of K+1 tokens; the DP; and
every function's compile time. From these and the tau ranges the CLaSp paper
reports, `project_speedup` gives a labelled projection of tokens/s gains.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax import model as model_lib
from clasp_jax import sharding
from clasp_jax.cache import init_cache
from clasp_jax.config import LlamaConfig
from clasp_jax.strategies import clasp_dp

# Nominal HBM bandwidth (bytes/s) by device kind, for the weight-bytes roofline.
HBM_BANDWIDTH = {'H100': 3.35e12, 'H200': 4.8e12, 'A100': 2.0e12, 'TPU v5 lite': 8.19e11,
                 'TPU v4': 1.2e12, 'TPU v5p': 2.76e12}

# Published CLaSp numbers (../shared/design/CLASP.md): tau range over Spec-Bench tasks and
# the measured overall speedup.
PAPER = {'llama3-8b': dict(tau=(3.68, 6.22), speedup=1.24),
         'llama3-70b': dict(tau=(4.05, 7.19), speedup=1.67)}


@dataclasses.dataclass(frozen=True)
class Timing:
  ms: float
  compile_s: float


def time_fn(fn: Callable[..., Any], *args, reps: int = 20, warmup: int = 3,
            feed: Callable[[Any, tuple], tuple] | None = None) -> Timing:
  """Median wall time of `fn(*args)` in ms, synchronised per call, and its compile time.

  Args:
    fn: a jitted function.
    *args: its arguments.
    reps: timed calls.
    warmup: untimed calls after the compile.
    feed: maps (output, args) to the next call's args (for functions that donate a cache).
  """
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(warmup + reps):
    if feed is not None:
      args = feed(out, args)
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    if i >= warmup:
      times.append((time.perf_counter() - t0) * 1e3)
  return Timing(ms=statistics.median(times), compile_s=compile_s)


def hbm_bandwidth() -> tuple[float, str]:
  """The device's HBM bandwidth in bytes/s and where the figure comes from."""
  kind = jax.devices()[0].device_kind
  for name, bw in HBM_BANDWIDTH.items():
    if name in kind:
      return bw, f'nominal {name}'
  x = jnp.ones((1 << 28,), jnp.float32)  # 1 GiB: measure a device copy instead
  t = time_fn(jax.jit(lambda a: a + 1), x, reps=10)
  return 2 * x.nbytes / (t.ms / 1e3), 'measured copy'


def decode_bytes(config: LlamaConfig, itemsize: int) -> int:
  """Weight bytes a decode step must read: every layer, the final norm and the LM head."""
  embed_rows_unread = 0 if config.tie_embeddings else config.vocab_size * config.hidden_size
  return (config.num_params - embed_rows_unread) * itemsize


def random_params(config: LlamaConfig, dtype, mesh: jax.sharding.Mesh) -> dict:
  """Random per-layer params as a decoder holds them (see `model.unstack_layers`), built one
  layer at a time, each straight into its tensor-parallel sharding (`sharding`'s rules), so
  that the largest shapes never need two copies of the weights."""
  one = dataclasses.replace(config, num_layers=1)
  n = sharding.tp_size(mesh)

  def init(key):
    params = model_lib.init_params(one, key, dtype)
    lp = jax.tree.map(lambda w: w[0], params['layers'])
    return dict(params, layers=model_lib.fuse_projections(lp, n, sharding.fuse_qkv(config, n)))

  make = jax.jit(init, out_shardings=sharding.tree_shardings(
      jax.eval_shape(init, jax.random.key(0)), config, mesh))
  params = make(jax.random.key(0))
  layers = [params['layers']] + [make(jax.random.key(i))['layers']
                                 for i in range(1, config.num_layers)]
  return dict(params, layers=tuple(layers))


def fits(config: LlamaConfig, context: int, itemsize: int) -> bool:
  """Whether params and the cache fit the devices' memory."""
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get('bytes_limit', 0) * jax.device_count()
  if not limit:
    return True
  need = (config.num_params * itemsize
          + 2 * config.num_layers * context * config.num_kv_heads * config.head_dim * itemsize)
  return need < 0.96 * limit


def measure_shape(name: str, config: LlamaConfig, context: int, *,
                  dtype=jnp.bfloat16, verify_sizes=(2, 5, 9), skip_fractions=(0.25, 0.5, 0.6),
                  reps: int = 20) -> dict:
  """Times one preset at one context length; returns a JSON-able row.

  With several devices, params and cache are sharded tensor-parallel over all of them.
  """
  L = config.num_layers
  mesh = sharding.make_mesh('auto')
  params = random_params(config, dtype, mesh)
  start = context - 64  # the cache is nearly full: attention reads a full context
  make_cache = functools.partial(init_cache, config, context, dtype=dtype)
  cache_sharding = sharding.tree_shardings(jax.eval_shape(make_cache), config, mesh)

  def fresh_cache():
    return jax.jit(make_cache, out_shardings=cache_sharding)().rollback(start)

  def feed_cache(index):  # steps donate their cache: feed the new one back, rolled back
    return lambda out, args: args[:index] + (out.cache.rollback(start),) + args[index + 1:]

  cache = fresh_cache()
  token = jnp.ones((1, 1), jnp.int32)
  advance = feed_cache(1)

  full = jax.jit(lambda p, c, t: model_lib.forward(p, config, t, c), donate_argnums=(1,))
  t_full = time_fn(full, params, cache, token, reps=reps, feed=advance)
  cache = fresh_cache()
  bandwidth, bw_source = hbm_bandwidth()
  bandwidth *= jax.device_count()
  roofline_ms = decode_bytes(config, jnp.dtype(dtype).itemsize) / bandwidth * 1e3
  row = dict(preset=name, context=context, num_layers=L, params_b=config.num_params / 1e9,
             device=jax.devices()[0].device_kind, num_devices=jax.device_count(),
             hbm_bandwidth=bandwidth, bandwidth_source=bw_source, full_ms=t_full.ms,
             full_compile_s=t_full.compile_s,
             roofline_ms=roofline_ms, roofline_fraction=roofline_ms / t_full.ms, drafts=[],
             verify=[])

  draft = jax.jit(lambda p, layers, ids, c, t: model_lib.forward(
      dict(p, layers=layers), config, t, c, layer_ids_A=ids), donate_argnums=(3,))
  cond_draft = jax.jit(lambda p, skip, c, t: model_lib.forward(p, config, t, c, skip_L=skip),
                       donate_argnums=(2,))
  stack = jax.jit(lambda p: dict(
      p, layers=jax.tree.map(lambda *w: jnp.stack(w), *p['layers'])))
  rng = np.random.default_rng(0)
  for frac in skip_fractions:
    M = round(frac * L)
    skip_L = jnp.asarray(np.isin(np.arange(L), rng.choice(L, M, replace=False)))
    layers, ids = model_lib.active_layers(params, skip_L)
    t_draft = time_fn(draft, params, layers, jnp.asarray(ids), cache, token, reps=reps,
                      feed=feed_cache(3))
    cache = fresh_cache()
    entry = dict(M=M, draft_ms=t_draft.ms, ratio_to_full=t_draft.ms / t_full.ms,
                 ideal_ratio=(L - M) / L, draft_compile_s=t_draft.compile_s)
    if frac == 0.5 and fits(config, context, 2 * jnp.dtype(dtype).itemsize):
      stacked = stack(params)  # the reference path's layout
      t_cond = time_fn(cond_draft, stacked, skip_L, cache, token, reps=reps, feed=feed_cache(2))
      del stacked
      cache = fresh_cache()
      entry.update(cond_draft_ms=t_cond.ms, cond_ratio_to_full=t_cond.ms / t_full.ms)
    if frac == 0.5:
      t_dp = time_fn(jax.jit(clasp_dp, static_argnums=(1, 4)), params, config, cache,
                     jnp.ones((L + 1, config.hidden_size), dtype), M, reps=5)
      row.update(dp_M=M, dp_ms=t_dp.ms, dp_compile_s=t_dp.compile_s)
    row['drafts'].append(entry)

  verify = jax.jit(lambda p, c, t: model_lib.forward(p, config, t, c),
                   donate_argnums=(1,))
  for size in verify_sizes:
    t_verify = time_fn(verify, params, cache, jnp.ones((1, size), jnp.int32), reps=reps,
                       feed=advance)
    cache = fresh_cache()
    row['verify'].append(dict(tokens=size, ms=t_verify.ms, ratio_to_full=t_verify.ms / t_full.ms,
                              compile_s=t_verify.compile_s))
  return row


def project_speedup(row: dict, tau: float, *, num_draft_tokens: int = 8, loi: int = 1) -> float:
  """Projected CLaSp speedup: tokens per round over cost per round, in full-step units.

  A round drafts d = min(K, ceil(tau - 1) + 1) tokens (drafting continues one token past the
  last accepted one before the exit threshold stops it), verifies K+1 tokens and, every LOI
  rounds, runs the DP. Assumes M = L/2 and the verify cost of K+1 = 9 tokens.
  """
  half = next(d for d in row['drafts'] if abs(d['ideal_ratio'] - 0.5) < 0.05)
  verify = next(v for v in row['verify'] if v['tokens'] == num_draft_tokens + 1)
  drafts = min(num_draft_tokens, int(np.ceil(tau - 1)) + 1)
  cost_ms = drafts * half['draft_ms'] + verify['ms'] + row['dp_ms'] / loi
  return tau * row['full_ms'] / cost_ms


def markdown(rows: list[dict]) -> str:
  """The results as markdown tables."""
  lines = ['| preset | ctx | full ms | roofline ms | % roofline | verify ms (2/5/9) | '
           'DP ms (M=L/2) | DP / verify(9) |',
           '|---|---|---|---|---|---|---|---|']
  for r in rows:
    v = {x['tokens']: x['ms'] for x in r['verify']}
    lines.append(
        f"| {r['preset']} | {r['context']} | {r['full_ms']:.2f} | {r['roofline_ms']:.2f} | "
        f"{100 * r['roofline_fraction']:.0f}% | {v.get(2, 0):.2f} / {v.get(5, 0):.2f} / "
        f"{v.get(9, 0):.2f} | {r['dp_ms']:.2f} | {r['dp_ms'] / v.get(9, np.nan):.2f} |")
  lines += ['', '| preset | ctx | M | draft ms | draft / full | ideal (L-M)/L | '
            'cond-path draft / full |', '|---|---|---|---|---|---|---|']
  for r in rows:
    for d in r['drafts']:
      cond = f"{d['cond_ratio_to_full']:.2f}" if 'cond_ratio_to_full' in d else ''
      lines.append(f"| {r['preset']} | {r['context']} | {d['M']} | {d['draft_ms']:.2f} | "
                   f"{d['ratio_to_full']:.2f} | {d['ideal_ratio']:.2f} | {cond} |")
  return '\n'.join(lines)
