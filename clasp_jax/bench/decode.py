"""End-to-end decode speed through `Decoder.generate`, against the weight-bytes roofline.

What a user gets, measured as a user gets it: every figure comes from whole `generate` calls
(prefill, device loops, host coordination), never from pieces timed alone. The cost of one
more token is the difference between two generations of different lengths from the same
prompt, over the difference in tokens, so the prefill and per-call costs cancel:

  plain step    = (t(long) - t(short)) / (long - short), plain decoding (every round 1 token)
  drafting round = the same per round, for a static skip set of M = L/2 with DET 0 (every
                   round drafts K tokens): draft step = (round - plain step) / K, since a
                   verify pass of up to `pass_width` tokens is the same pass as a plain step
                   (not where plain steps run one row, `Decoder.rows_apart` on a CPU: there
                   the figure also holds what the verify pass's other rows cost)
  refresh       = CLaSp's DP plus the skip-set switch, per round, at LOI 1 (layer-skip
                   drafts only: a round with a lookup draft costs less than a static round):
                   its round less the static round. A switch is paid only where the DP
                   changes the set, so this depends on how often it does on these weights:
                   over the host's refreshes per round (with the DP in the verify passes, a
                   segment returns to the host only where the set changes) it is the cost
                   of one change
  prefill       = the time to the first token: a 1-token generation (the prefill's program
                   and the call's own costs) from a prompt of the case's `context` tokens

Random weights of a preset's shape (a random model writes degenerate text; speed does not
care, and DET 0 fixes the drafts per round). The roofline is the time to read the weights
once per token at the device's memory bandwidth; on a mesh (`--mesh=tp:2`: this commit's
engine, tensor-parallel) each device reads its share, so the roofline is the weights over the
devices' combined bandwidth.

The measuring runs in worker processes (this module run as a script) that import `clasp_jax`
from the path given: the current checkout, or an older one, so that the figures of an older
commit come from the same run on the same machine. A worker uses only what both engines
provide: `Decoder(params, config, strategy)`, `generate`, `strategies.build`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import time
from typing import Callable

#: HBM bandwidth by device kind (bytes per second; vendor datasheets), for the roofline.
BANDWIDTH = {'NVIDIA H200': 4.8e12, 'NVIDIA H100 80GB HBM3': 3.35e12}


@dataclasses.dataclass(frozen=True)
class Case:
  """One measurement: a model shape at a context length, with one engine setting.

  Attributes:
    preset: a `configs.models.PRESETS` name.
    context: tokens in the cache while decoding (the prompt is this less the long budget;
      for 'prefill', the prompt).
    what: 'plain', 'draft' (static, M = L/2, DET 0), 'refresh' (CLaSp, M = L/2, LOI 1) or
      'prefill' (plain decoding's first token).
    attention: the new engine's attention ('auto', 'xla', 'pallas'); ignored by old ones.
  """

  preset: str
  context: int
  what: str = 'plain'
  attention: str = 'auto'


def random_params(config, key, dtype, mesh=None):
  """Random per-layer params (q/k/v and gate/up fused: the accelerator layout), generated
  layer by layer in `dtype`, so a 70B model never exists in float32 or stacked; on a mesh,
  each layer is generated straight into the sharding rules' places, so no device ever holds
  more than its share. Engines older than the per-shard fused layout (no `clasp_jax.sharding`)
  get theirs, q/k/v and gate/up concatenated."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim

  def normal(key, shape):
    return 0.02 * jax.random.normal(key, shape, dtype)

  if importlib.util.find_spec('clasp_jax.sharding') is not None:
    return _sharded_random_params(config, key, dtype, mesh, normal)
  layers = []
  for layer_key in jax.random.split(key, config.num_layers):
    k1, k2, k3, k4 = jax.random.split(layer_key, 4)
    layers.append(dict(attn_norm=jnp.ones((D,), dtype), w_qkv=normal(k1, (D, q + 2 * kv)),
                       wo=normal(k2, (q, D)), mlp_norm=jnp.ones((D,), dtype),
                       w_gate_up=normal(k3, (D, 2 * F)), w_down=normal(k4, (F, D))))
  k_embed, k_head = jax.random.split(jax.random.fold_in(key, 1))
  params = dict(embed=normal(k_embed, (V, D)), final_norm=jnp.ones((D,), dtype),
                layers=tuple(layers))
  if not config.tie_embeddings:
    params['lm_head'] = normal(k_head, (D, V))
  return params


def _sharded_random_params(config, key, dtype, mesh, normal):
  """`random_params` in the per-shard fused layout, each layer made on the devices in its
  sharding (`clasp_jax.sharding`)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from clasp_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from clasp_jax import sharding  # pylint: disable=g-import-not-at-top
  D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  sharding.check(config, mesh)
  n = sharding.tp_size(mesh)

  def layer(key):
    ks = jax.random.split(key, 7)
    lp = dict(attn_norm=jnp.ones((D,), dtype), wq=normal(ks[0], (D, q)),
              wk=normal(ks[1], (D, kv)), wv=normal(ks[2], (D, kv)), wo=normal(ks[3], (q, D)),
              mlp_norm=jnp.ones((D,), dtype), w_gate=normal(ks[4], (D, F)),
              w_up=normal(ks[5], (D, F)), w_down=normal(ks[6], (F, D)))
    return model_lib.fuse_projections(lp, n, sharding.fuse_qkv(config, n))

  def top(key):
    k_embed, k_head = jax.random.split(key)
    params = dict(embed=normal(k_embed, (V, D)), final_norm=jnp.ones((D,), dtype))
    if not config.tie_embeddings:
      params['lm_head'] = normal(k_head, (D, V))
    return params

  def on_devices(fn):
    if mesh is None:
      return jax.jit(fn)
    shapes = jax.eval_shape(fn, key)
    return jax.jit(fn, out_shardings=sharding.tree_shardings(shapes, config, mesh))

  make_layer = on_devices(layer)
  layers = tuple(make_layer(k) for k in jax.random.split(key, config.num_layers))
  return dict(on_devices(top)(jax.random.fold_in(key, 1)), layers=layers)


def weight_bytes(params) -> int:
  """Bytes of weights a decode step reads: all of them but an untied embedding table, of
  which a step reads one row."""
  import jax  # pylint: disable=g-import-not-at-top
  read = {k: v for k, v in params.items() if k != 'embed' or 'lm_head' not in params}
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(read))


def _decoder(params, config, strategy, attention, mesh):
  from clasp_jax.engine import Decoder  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if 'attention' in inspect.signature(Decoder).parameters:
    kwargs['attention'] = attention
  if mesh is not None:
    kwargs['mesh'] = mesh
  return Decoder(params, config, strategy, **kwargs)


def _timed(decoder, prompt, max_new_tokens) -> tuple[float, int, int, int]:
  """(seconds, new tokens, rounds, the host's skip-set refreshes) of one generation (an
  engine that does not report its refreshes: 0)."""
  start = time.perf_counter()
  out = decoder.generate(prompt, max_new_tokens)
  return (time.perf_counter() - start, len(out.token_ids), len(out.accept_lengths),
          len(getattr(out, 'refresh_times', ())))


def case_strategy(what: str, config):
  """The strategy a case measures: 'plain' decoding (and its 'prefill'); 'draft', static
  drafting at M = L / 2
  (every other layer), K = 8, DET 0; 'refresh', CLaSp at M = L / 2, LOI 1, layer-skip drafts
  only, K = 8, DET 0."""
  from clasp_jax import strategies  # pylint: disable=g-import-not-at-top
  L, K = config.num_layers, 8
  if what in ('plain', 'prefill'):
    return strategies.build('vanilla', config)
  if what == 'draft':
    return strategies.build('static', config, skip_set=tuple(range(1, L, 2))[:L // 2],
                            num_draft_tokens=K, draft_exit_threshold=0.0)
  return strategies.build('clasp', config, skip_layers=L // 2, num_draft_tokens=K,
                          draft_exit_threshold=0.0, loi=1, lookup=False)


def measure(cases: list[Case], params, config, short: int, long: int, reps: int,
            mesh=None) -> list[dict]:
  """Each case's per-token (or per-round) seconds on one model, from two generation lengths;
  a 'prefill' case's seconds to the first token, from 1-token generations.

  Every generation is compiled and run once untimed first. Then each of `reps` turns times
  every case's generations before the next turn, so that cases measured together see the
  same machine: a drift of its speed during the run falls on all of them, not on whichever
  ran last (`--interleave`; a case measured alone takes its turns alone).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  runs = []
  for case in cases:
    decoder = _decoder(params, config, case_strategy(case.what, config), case.attention, mesh)
    lengths = (1,) if case.what == 'prefill' else (short, long)
    prompt_len = case.context if case.what == 'prefill' else case.context - long
    prompt = np.random.RandomState(0).randint(0, config.vocab_size, prompt_len).tolist()
    for n in lengths:
      decoder.generate(prompt, n)  # compiles
    runs.append((decoder, prompt, lengths))
  timed = [{n: [] for n in lengths} for _, _, lengths in runs]  # length -> _timed's tuples
  for _ in range(reps):
    for (decoder, prompt, lengths), by_length in zip(runs, timed):
      for n in lengths:
        by_length[n].append(_timed(decoder, prompt, n))
  rows = []
  for case, (decoder, _, lengths), by_length in zip(cases, runs, timed):
    medians = {n: sorted(by_length[n])[reps // 2] for n in lengths}
    if case.what == 'prefill':
      rows.append(dict(seconds_to_first_token=medians[1][0]))
      continue
    (t_short, n_short, r_short, f_short), (t_long, n_long, r_long, f_long) = (
        medians[short], medians[long])
    rounds = max(r_long - r_short, 1)
    rows.append(dict(seconds_per_token=(t_long - t_short) / max(n_long - n_short, 1),
                     seconds_per_round=(t_long - t_short) / rounds,
                     tokens_per_round=(n_long - n_short) / rounds,
                     refreshes_per_round=(f_long - f_short) / rounds,
                     search_passes=getattr(decoder, 'search_passes', 1),
                     generate_seconds_long=t_long, new_tokens_long=n_long))
  return rows


def worker(spec: dict) -> list[dict]:
  """Measures every case of `spec` with the `clasp_jax` on sys.path; one result per case."""
  import jax  # pylint: disable=g-import-not-at-top
  from clasp_jax.config import LlamaConfig  # pylint: disable=g-import-not-at-top
  mesh = None
  if spec['mesh']:  # this commit's engine only (run_engine)
    from clasp_jax import sharding  # pylint: disable=g-import-not-at-top
    mesh = sharding.make_mesh(spec['mesh'])
  num_devices = 1 if mesh is None else mesh.size
  cases = [Case(**case_dict) for case_dict in spec['cases']]
  if spec.get('interleave'):  # each preset's cases measured together, in turns
    groups = [[c for c in cases if c.preset == p] for p in dict.fromkeys(c.preset for c in cases)]
  else:
    groups = [[c] for c in cases]
  results, models = [], {}
  for group in groups:
    rows = [dict(dataclasses.asdict(c), engine=spec['engine'], mesh=spec['mesh'],
                 num_devices=num_devices, device_kind=jax.devices()[0].device_kind,
                 jax_version=jax.__version__) for c in group]
    preset = group[0].preset
    try:  # a model that does not fit, or does not split over the mesh, is an error row
      if preset not in models:
        models.clear()  # one model in memory at a time (70B fills a GPU)
        config = LlamaConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in spec['configs'][preset].items()
                                if k != 'rope_scaling'})
        models[preset] = config, random_params(config, jax.random.key(0), spec['dtype'], mesh)
      config, params = models[preset]
      measured = measure(group, params, config, spec['short'], spec['long'], spec['reps'], mesh)
      read = weight_bytes(params)
      for row, figures in zip(rows, measured):
        row.update(figures, weight_bytes=read)
    except Exception as e:  # pylint: disable=broad-except
      for row in rows:
        row['error'] = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
    for row in rows:
      results.append(row)
      print(json.dumps(row), flush=True)
  return results


def run_engine(checkout: str, engine: str, cases: list[Case], configs: dict, *, dtype: str,
               short: int, long: int, reps: int, mesh: str = '', interleave: bool = False,
               on_row: Callable[[dict], None] | None = None) -> list[dict]:
  """Runs a worker process that imports `clasp_jax` from `checkout`; its result rows.

  `mesh` ('tp:N', 'auto'; engines with `clasp_jax.sharding` only) runs the decoders
  tensor-parallel; '' on one device. `interleave`: each preset's cases are timed in turns
  (see `measure`), else one after the other. `on_row` is called with each row as soon as the
  worker measures it (a run stopped early keeps what it measured).
  """
  spec = dict(engine=engine, cases=[dataclasses.asdict(c) for c in cases], configs=configs,
              dtype=dtype, short=short, long=long, reps=reps, mesh=mesh, interleave=interleave)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [checkout] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), json.dumps(spec)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  rows = []

  def add(row):
    rows.append(row)
    if on_row is not None:
      on_row(row)

  for line in proc.stdout:  # one row per case, shown as soon as it is measured
    if line.startswith('{'):
      add(json.loads(line))
      print(line, end='', flush=True)
  stderr = proc.stderr.read()
  if proc.wait():
    add(dict(engine=engine, mesh=mesh, error=f'worker exit {proc.returncode}: '
             + ' | '.join(stderr.strip().splitlines()[-3:])))
  return rows


def summarize(rows: list[dict]) -> list[dict]:
  """Adds the roofline fraction, the draft-step fraction and the refresh cost to the rows.

  On a mesh the roofline is the weights read at the devices' combined bandwidth.
  """
  def key(r):
    return r['engine'], r.get('mesh', ''), r['preset'], r['context'], r['attention']

  plain = {key(r): r for r in rows if r.get('what') == 'plain' and 'error' not in r}
  static = {key(r): r for r in rows if r.get('what') == 'draft' and 'error' not in r}
  for r in rows:
    if 'error' in r or 'what' not in r:
      continue
    bandwidth = BANDWIDTH.get(r['device_kind'])
    if r['what'] == 'plain' and bandwidth:
      r['roofline_seconds'] = r['weight_bytes'] / (bandwidth * r.get('num_devices', 1))
      r['roofline_fraction'] = r['roofline_seconds'] / r['seconds_per_token']
    step = plain.get(key(r), {}).get('seconds_per_token')
    if r['what'] == 'draft' and step:
      r['draft_step_fraction'] = (r['seconds_per_round'] - step) / 8 / step
    if r['what'] == 'refresh' and key(r) in static and step:
      r['refresh_in_verify_passes'] = (r['seconds_per_round']
                                       - static[key(r)]['seconds_per_round']) / step
      # Each round's verify pass runs a band of the DP's table: a table takes search_passes
      # rounds, and its cost, the switches it led to included, is the excess over them.
      r['table_in_verify_passes'] = r['refresh_in_verify_passes'] * r.get('search_passes', 1)
      if r.get('refreshes_per_round'):
        r['change_in_verify_passes'] = r['refresh_in_verify_passes'] / r['refreshes_per_round']
  return rows


def markdown(rows: list[dict]) -> str:
  """The rows as a markdown table."""
  lines = ['| engine | mesh | preset | context | attention | what | ms/token | ms/round | '
           'roofline | draft step / plain step | refresh (verify passes) | '
           'DP table (verify passes) | host refreshes / round | a change (verify passes) | '
           'first token ms |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  def fmt(value, spec):
    return format(value, spec) if value is not None else ''
  for r in rows:
    mesh = r.get('mesh') or '1 device'
    if 'error' in r:
      lines.append(f"| {r.get('engine', '')} | {mesh} | {r.get('preset', '')} | "
                   f"{r.get('context', '')} | {r.get('attention', '')} | {r.get('what', '')} | "
                   f"error: {r['error']} | | | | | | | | |")
      continue
    ms = {k: 1e3 * r[k] if k in r else None
          for k in ('seconds_per_token', 'seconds_per_round', 'seconds_to_first_token')}
    lines.append(
        f"| {r['engine']} | {mesh} | {r['preset']} | {r['context']} | {r['attention']} | "
        f"{r['what']} | "
        f"{fmt(ms['seconds_per_token'], '.3f')} | {fmt(ms['seconds_per_round'], '.3f')} | "
        f"{fmt(r.get('roofline_fraction'), '.0%')} | {fmt(r.get('draft_step_fraction'), '.2f')} "
        f"| {fmt(r.get('refresh_in_verify_passes'), '.2f')} "
        f"| {fmt(r.get('table_in_verify_passes'), '.2f')} "
        f"| {fmt(r.get('refreshes_per_round'), '.2f')} "
        f"| {fmt(r.get('change_in_verify_passes'), '.2f')} "
        f"| {fmt(ms['seconds_to_first_token'], '.2f')} |")
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  worker(json.loads(sys.argv[1]))
