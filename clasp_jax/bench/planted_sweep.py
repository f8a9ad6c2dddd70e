"""An epsilon sweep on planted models: every method through the real `Decoder`, measured.

For each epsilon, the planted model (`bench.planted`) is built and every method decodes the same
prompts: plain decoding, the paper's CLaSp (layer-skip drafts only) at fixed M = round(0.4 L)
and round(0.5 L) and with M chosen online ('auto'), the default method (`clasp`: M chosen
online, prompt lookup first), a static skip set (the planted set, or M = 0.5 L layers spread
evenly), and prompt lookup. Every method is warmed up first; then the methods take turns per
prompt, in an order that rotates from one prompt to the next, so that drifts of the machine fall
on all of them alike. A timed generation during which JAX traced or compiled anything (on
accelerators, a drafting segment for an M that the warm-up did not reach) is run again, up to
twice, so that no reported time includes compilation; its tokens are the same ('auto' keeps learning
across the runs, as it does across prompts).

Per point and method it reports tau, drafts per round, the share of rounds that drafted,
tokens/s and the speedup over plain decoding in the same run, the cost of a round in plain
decoding rounds, refresh (DP) time, the precision and recall of the skip sets in force against
the planted set, and whether the tokens equal plain decoding's (the engine computes a
token's logits the same way in every pass, so any difference is a bug, reported with where
it happens). Per point it reports how diverse plain decoding's text is. A random model falls
into a loop on some prompts, and on a loop every drafter looks perfect, so each point screens
its prompts first: plain decoding runs on candidates until enough of them give diverse text,
only those are timed, and the point says how many it dropped. A point where too few candidates
give diverse text is flagged and must not be quoted.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
import dataclasses
import functools
import gc
import os
import time
from typing import Any

import jax
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from clasp_jax import sharding
from clasp_jax import strategies
from clasp_jax.bench import planted as planted_lib
from clasp_jax.config import LlamaConfig
from clasp_jax.engine import Decoder, Generation
from clasp_jax.sampling import SamplingConfig
from clasp_jax.strategies.base import DRAFT_SOURCES

BASELINE = 'vanilla'
#: Method labels, in the order they run and are reported. 'default' is `--method=clasp` as
#: a user gets it (M online, prompt lookup first); the other clasp runs are the paper's CLaSp.
#: 'clasp-planted' skips as many layers as are planted (the paper's best M for LLaMA-3-70B
#: is 44 of 80: plant a share of 0.55 to match it).
METHODS = ('vanilla', 'clasp-0.4L', 'clasp-0.5L', 'clasp-0.5L-dp-pass', 'clasp-planted',
           'clasp-auto', 'clasp-auto-dp-pass', 'default', 'static', 'pld')
#: What a sweep runs unless told: every method but 'clasp-planted', which at the default
#: planted share repeats 'clasp-0.5L'.
DEFAULT_METHODS = tuple(m for m in METHODS if m != 'clasp-planted')
#: The fixed-M CLaSp runs: label -> M as a share of L.
FIXED_M_SHARES = {'clasp-0.4L': 0.4, 'clasp-0.5L': 0.5, 'clasp-0.5L-dp-pass': 0.5}
#: Suffix of the runs whose DP is a pass of its own at each refresh (`Clasp.dp_in_verify` off).
DP_PASS = '-dp-pass'
STATIC_SETS = ('planted', 'even')
#: The CLaSp paper's overall Spec-Bench speedups and the tau ranges they came with.
PAPER = {'llama3-8b': dict(tau=(3.68, 6.22), speedup=1.24),
         'llama3-70b': dict(tau=(4.05, 7.19), speedup=1.67)}
_COMPILE_EVENTS = '/jax/core/compile/'
_MAX_RERUNS = 2
#: Candidate prompts per timed prompt that a point may screen (`screen_prompts`).
CANDIDATES_PER_PROMPT = 3


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """One method of the sweep, as `strategies.build` takes it.

  Attributes:
    label: the name it is reported under.
    method: the `strategies.build` method.
    skip_layers: M for clasp (an integer, or 'auto').
    skip_set: the static skip set.
    lookup: clasp's prompt lookup first (the default method), or layer-skip drafts only.
    dp_in_verify: clasp's DP filled inside the verify passes, or a pass of its own.
  """

  label: str
  method: str
  skip_layers: int | str | None = None
  skip_set: tuple[int, ...] | None = None
  lookup: bool = False
  dp_in_verify: bool = True


def method_specs(spec: planted_lib.PlantedModel, labels: Sequence[str],
                 static_set: str = 'planted') -> list[MethodSpec]:
  """The sweep's methods for a planted model; vanilla always comes first.

  Args:
    spec: the planted model (its L and planted set).
    labels: from `METHODS`.
    static_set: 'planted' (static skips exactly the planted layers: the best any skip-set
      search could find) or 'even' (round(0.5 L) layers spread evenly, never the first or
      last: what a search-free guess would skip).

  Raises:
    ValueError: for an unknown label or static set.
  """
  unknown = sorted(set(labels) - set(METHODS))
  if unknown:
    raise ValueError(f'unknown methods {unknown}; choose from {", ".join(METHODS)}')
  if static_set not in STATIC_SETS:
    raise ValueError(f'static_set must be one of {STATIC_SETS}, got {static_set!r}')
  L = spec.config.num_layers
  specs = []
  for label in [BASELINE] + [m for m in METHODS if m in labels and m != BASELINE]:
    in_verify = not label.endswith(DP_PASS)
    if label in FIXED_M_SHARES:
      specs.append(MethodSpec(label, 'clasp', skip_layers=round(FIXED_M_SHARES[label] * L),
                              dp_in_verify=in_verify))
    elif label == 'clasp-planted':
      specs.append(MethodSpec(label, 'clasp', skip_layers=len(spec.planted)))
    elif label.startswith('clasp-auto'):
      specs.append(MethodSpec(label, 'clasp', skip_layers='auto', dp_in_verify=in_verify))
    elif label == 'default':
      specs.append(MethodSpec(label, 'clasp', skip_layers='auto', lookup=True))
    elif label == 'static':
      skip_set = (spec.planted if static_set == 'planted'
                  else strategies.evenly_spaced_skip_set(spec.config, round(0.5 * L)))
      specs.append(MethodSpec(label, 'static', skip_set=tuple(skip_set)))
    else:
      specs.append(MethodSpec(label, label))
  return specs


@dataclasses.dataclass(frozen=True)
class SweepSettings:
  """How every point of the sweep decodes and is timed.

  Attributes:
    max_new_tokens: tokens per generation.
    warmup: untimed generations per method and point before timing (at least 1, so that
      nothing timed compiles the first time).
    num_draft_tokens: K.
    draft_exit_threshold: DET.
    loi: CLaSp's rounds between DP refreshes.
    temperature: 0 decodes greedily (and checks that every method gives plain decoding's
      tokens); otherwise speculative sampling, whose tokens differ from plain sampling's.
    dtype: the params' dtype.
    per_layer: the params' layout (`planted.build_params`): per layer on accelerators.
    cost_cache_dir: where 'auto' keeps its measured step costs (None: measured per point).
    mesh: '' (one device) or a tensor-parallel mesh, 'tp:N' or 'auto' (`sharding.parse_mesh`):
      the params are built on it and every decoder runs sharded over it (per layer only).
  """

  max_new_tokens: int = 256
  warmup: int = 2
  num_draft_tokens: int = strategies.MAX_DEFAULT_NUM_DRAFT_TOKENS
  draft_exit_threshold: float = strategies.DEFAULT_DRAFT_EXIT_THRESHOLD
  loi: int = strategies.DEFAULT_LOI
  temperature: float = 0.0
  dtype: str = 'float32'
  per_layer: bool = False
  cost_cache_dir: str | None = None
  mesh: str = ''

  def __post_init__(self):
    if sharding.parse_mesh(self.mesh) is not None and not self.per_layer:
      raise ValueError('a mesh needs the per-layer layout')
    if self.warmup < 1:
      raise ValueError(f'warmup must be >= 1 (the first generation compiles), got '
                       f'{self.warmup}')
    if self.max_new_tokens < 1:
      raise ValueError(f'max_new_tokens must be >= 1, got {self.max_new_tokens}')


def make_prompts(vocab_size: int, count: int, length: int, seed: int = 0,
                 repeat_share: float = 0.3) -> list[list[int]]:
  """Random prompts in which some n-grams recur, so that prompt lookup has matches to find.

  Each prompt is a chain of segments of 4-8 random tokens; with probability `repeat_share`
  a segment is instead a copy of an earlier one.
  """
  rng = np.random.default_rng(seed)
  prompts = []
  for _ in range(count):
    segments, size = [], 0
    while size < length:
      if segments and rng.random() < repeat_share:
        segment = segments[rng.integers(len(segments))]
      else:
        segment = rng.integers(0, vocab_size, rng.integers(4, 9)).tolist()
      segments.append(segment)
      size += len(segment)
    prompts.append([t for segment in segments for t in segment][:length])
  return prompts


class _CompileWatch:
  """Counts JAX tracing and compilation events (seconds) while it is active."""

  def __init__(self):
    self.seconds = 0.0
    self.active = False
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if self.active and event.startswith(_COMPILE_EVENTS):
      self.seconds += duration

  def run(self, fn: Callable[[], Generation]) -> tuple[Generation, float]:
    """fn() and the seconds JAX spent tracing or compiling during it."""
    self.seconds, self.active = 0.0, True
    try:
      return fn(), self.seconds
    finally:
      self.active = False


@functools.cache
def _watch() -> _CompileWatch:
  """The process's one watch (JAX listeners are registered for good)."""
  return _CompileWatch()


def _timed(decoder: Decoder, prompt: list[int],
           max_new_tokens: int) -> tuple[Generation, int, bool]:
  """A generation, how many earlier runs of it compiled and were dropped, and whether it
  compiled too (after `_MAX_RERUNS` reruns: something recompiles every time)."""
  reruns = 0
  while True:
    generation, compiled = _watch().run(lambda: decoder.generate(prompt, max_new_tokens))
    if not compiled or reruns == _MAX_RERUNS:
      return generation, reruns, bool(compiled)
    reruns += 1


def _mean(values) -> float | None:
  values = list(values)
  return float(np.mean(values)) if values else None


def screen_prompts(decoder: Decoder, candidates: Sequence[list[int]], count: int,
                   max_new_tokens: int) -> tuple[list[int], list[list[int]]]:
  """The first `count` candidates on which plain decoding writes diverse text.

  Args:
    decoder: a plain decoding `Decoder` of the point's model.
    candidates: prompts, tried in order.
    count: how many to keep.
    max_new_tokens: tokens per generation.

  Returns:
    (the kept candidates' indices, plain decoding's tokens for every candidate tried).
  """
  kept, tried = [], []
  for i, prompt in enumerate(candidates):
    if len(kept) == count:
      break
    tried.append(decoder.generate(prompt, max_new_tokens).token_ids)
    if not planted_lib.diversity(tried[-1]).degenerate:
      kept.append(i)
  return kept, tried


def find_mismatches(reference: Sequence[list[int]],
                    generations: Sequence[Generation]) -> list[dict[str, Any]]:
  """Where each generation first leaves plain decoding's tokens (any difference is a bug).

  Returns:
    One entry per differing prompt: the prompt's index, the first differing position, and
    both tokens there (None where one generation ended first).
  """
  found = []
  for i, (ref, g) in enumerate(zip(reference, generations)):
    if g.token_ids == ref:
      continue
    at = next((t for t, (a, b) in enumerate(zip(g.token_ids, ref)) if a != b),
              min(len(g.token_ids), len(ref)))
    found.append(dict(prompt=i, position=at, reference_token=ref[at] if at < len(ref) else None,
                      token=g.token_ids[at] if at < len(g.token_ids) else None))
  return found


def summarise_method(spec: planted_lib.PlantedModel, generations: Sequence[Generation],
                     mismatches: list[dict[str, Any]] | None) -> dict[str, Any]:
  """One method's figures at one point (speedup and round cost are added by `run_point`).

  Args:
    spec: the planted model.
    generations: its timed generations, one per prompt.
    mismatches: from `find_mismatches`, or None (sampling: nothing to compare).
  """
  accepted = [a for g in generations for a in g.accept_lengths]
  drafted = [d for g in generations for d in g.draft_lengths]
  sources = collections.Counter(s for g in generations for s in g.draft_sources)
  drafting_sets = [s for g in generations for s, source in zip(g.skip_sets, g.draft_sources)
                   if source == 'skip']
  # (drafts, tokens committed) of every layer-skip round: what a shorter draft limit would
  # have given those rounds (min(accepted, d) + 1 tokens for d drafts) can be read from it,
  # without assuming that drafts are accepted independently of one another.
  outcomes = collections.Counter(
      (d, a) for g in generations
      for a, d, source in zip(g.accept_lengths, g.draft_lengths, g.draft_sources)
      if source == 'skip')
  scores = [spec.skip_precision_recall(s) for s in drafting_sets]
  refresh = [sum(g.refresh_times) for g in generations]
  wall = sum(g.wall_time for g in generations)
  row = dict(
      tau=_mean(accepted), drafts_per_round=_mean(drafted),
      drafting_fraction=_mean(d > 0 for d in drafted),
      tokens_per_second=_mean(g.tokens_per_second for g in generations),
      seconds_per_round=wall / max(len(accepted), 1), wall_time=wall,
      generation_seconds=[g.wall_time for g in generations],
      refreshes_per_generation=_mean(len(g.refresh_times) for g in generations),
      refresh_seconds=float(sum(refresh)), refresh_seconds_per_generation=_mean(refresh),
      refresh_share=float(sum(refresh)) / wall if wall else None,
      rounds_by_source={source: sources[source] for source in DRAFT_SOURCES},
      skip_rounds_by_m=dict(sorted(collections.Counter(int(s.sum()) for s in drafting_sets)
                                   .items())),
      skip_round_outcomes={f'{d}:{a}': n for (d, a), n in sorted(outcomes.items())},
      mean_skip=_mean(int(s.sum()) for s in drafting_sets),
      precision=_mean(p for p, _ in scores), recall=_mean(r for _, r in scores))
  if mismatches is not None:
    row.update(identical=len(generations) - len(mismatches), mismatches=mismatches)
  return row


def run_point(spec: planted_lib.PlantedModel, methods: Sequence[MethodSpec],
              candidates: Sequence[list[int]], num_prompts: int, warmup_prompt: list[int],
              settings: SweepSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Builds the planted model, decodes `num_prompts` prompts with every method, returns the
  point.

  The prompts are the first candidates on which plain decoding writes diverse text
  (`screen_prompts`); with too few of those, the first `num_prompts` candidates, and the point
  is degenerate. Screening decodes each timed prompt plainly once before the timed run, so
  the point also says how many of them plain decoding repeated token for token
  (`plain_repeated`): below all of them, plain decoding is not reproducible within one
  program, and a method's differences from it say nothing about the method. The params are
  built on the default device and dropped before returning, so that the next point can build
  its own (a 70B model fits once). On a mesh (`settings.mesh`) each weight is built in its
  shards and every decoder runs sharded.
  """
  sampling = SamplingConfig(temperature=settings.temperature)
  mesh = sharding.make_mesh(settings.mesh)
  params = planted_lib.build_params(spec, settings.dtype, per_layer=settings.per_layer,
                                    mesh=mesh)
  decoders = {}
  for m in methods:
    strategy = strategies.build(m.method, spec.config, skip_layers=m.skip_layers,
                                skip_set=m.skip_set, num_draft_tokens=settings.num_draft_tokens,
                                draft_exit_threshold=settings.draft_exit_threshold,
                                loi=settings.loi, lookup=m.lookup,
                                cost_cache_dir=settings.cost_cache_dir,
                                dp_in_verify=m.dp_in_verify)
    decoders[m.label] = Decoder(params, spec.config, strategy, sampling=sampling, mesh=mesh)
    t0 = time.perf_counter()
    # Every program a generation may run (auto: a drafting round per M), before any is timed:
    # a timed generation that compiled is run again, its policy a generation further on.
    decoders[m.label].compile(len(warmup_prompt), settings.max_new_tokens)
    for _ in range(settings.warmup):
      decoders[m.label].generate(warmup_prompt, settings.max_new_tokens)
    log(f'  eps {spec.epsilon:g} {m.label}: warmed up in {time.perf_counter() - t0:.1f} s')
  kept, screened = screen_prompts(decoders[BASELINE], candidates, num_prompts,
                                  settings.max_new_tokens)
  dropped = len(screened) - len(kept)
  log(f'  eps {spec.epsilon:g}: {dropped} of {len(screened)} candidate prompts dropped '
      f'(degenerate plain text)')
  if len(kept) < num_prompts:
    kept = list(range(num_prompts))
  prompts = [candidates[i] for i in kept]
  generations = {m.label: [] for m in methods}
  reruns, compiled = dict.fromkeys(generations, 0), dict.fromkeys(generations, 0)
  for i, prompt in enumerate(prompts):
    order = list(generations)
    for label in order[i % len(order):] + order[:i % len(order)]:
      generation, rerun, still_compiled = _timed(decoders[label], prompt,
                                                 settings.max_new_tokens)
      generations[label].append(generation)
      reruns[label] += rerun
      compiled[label] += still_compiled
  reference = [g.token_ids for g in generations[BASELINE]]
  plain_repeated = sum(screened[i] == tokens for i, tokens in zip(kept, reference))
  if plain_repeated < len(kept):
    log(f'  NOT REPRODUCIBLE: eps {spec.epsilon:g}: plain decoding repeated its screening '
        f'tokens on {plain_repeated} of {len(kept)} prompts')
  mismatches = {label: find_mismatches(reference, gens) if settings.temperature == 0 else None
                for label, gens in generations.items()}
  del decoders, params
  gc.collect()

  texts = [planted_lib.diversity(g) for g in reference]
  base = summarise_method(spec, generations[BASELINE], mismatches[BASELINE])
  rows = {}
  for label, gens in generations.items():
    row = summarise_method(spec, gens, mismatches[label])
    row.update(speedup=row['tokens_per_second'] / base['tokens_per_second'],
               round_cost=row['seconds_per_round'] / base['seconds_per_round'],
               compile_reruns=reruns[label], timed_with_compile=compiled[label])
    rows[label] = row
    for m in row.get('mismatches') or ():
      log(f'  LOSSLESSNESS FAILURE (a bug): eps {spec.epsilon:g} {label}, prompt {m["prompt"]}: '
          f'first differs from plain decoding at token {m["position"]}: {m}')
  diversity = [dict(dataclasses.asdict(d), degenerate=d.degenerate, reasons=d.reasons)
               for d in texts]
  return dict(epsilon=spec.epsilon, degenerate=any(d.degenerate for d in texts),
              prompts=kept, dropped_prompts=dropped, plain_repeated=plain_repeated,
              diversity=diversity, methods=rows)


def run_sweep(model: str | LlamaConfig, epsilons: Sequence[float], labels: Sequence[str], *,
              settings: SweepSettings, num_prompts: int = 4, prompt_len: int = 64,
              static_set: str = 'planted', fraction: float = planted_lib.DEFAULT_PLANTED_FRACTION,
              seed: int = 0, knobs: dict[str, float] | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs `run_point` at every epsilon; returns the sweep (JSON-able, see `markdown`).

  Args:
    model: a preset name or a `LlamaConfig` (`planted.planted_model`).
    epsilons: the points.
    labels: the methods (`METHODS`; vanilla always runs).
    settings: decoding and timing settings.
    num_prompts: timed prompts per point (screened from `CANDIDATES_PER_PROMPT` times as
      many candidates).
    prompt_len: tokens per prompt.
    static_set: see `method_specs`.
    fraction: the share of the layers planted.
    seed: seed of the weights, the planted set and the prompts.
    knobs: other `PlantedModel` fields.
    log: progress lines go here.
  """
  specs = [planted_lib.planted_model(model, epsilon=e, fraction=fraction, seed=seed,
                                     **(knobs or {})) for e in epsilons]
  config = specs[0].config
  methods = method_specs(specs[0], labels, static_set)
  prompts = make_prompts(config.vocab_size, 1 + CANDIDATES_PER_PROMPT * num_prompts, prompt_len,
                         seed)
  points = []
  for spec in specs:
    t0 = time.perf_counter()
    points.append(run_point(spec, methods, prompts[1:], num_prompts, prompts[0], settings, log))
    log(f'eps {spec.epsilon:g} done in {time.perf_counter() - t0:.0f} s')
    log(point_markdown(points[-1]))
  return dict(
      config=dataclasses.asdict(config), planted=list(specs[0].planted),
      knobs={f.name: getattr(specs[0], f.name) for f in dataclasses.fields(specs[0])
             if f.name not in ('config', 'planted', 'epsilon')},
      methods=[dataclasses.asdict(m) for m in methods], settings=dataclasses.asdict(settings),
      num_prompts=num_prompts, prompt_len=prompt_len, static_set=static_set, points=points)


def _fmt(value, spec: str = '.2f') -> str:
  return '' if value is None else format(value, spec)


_HEADER = ('| eps | method | tau | drafts/round | drafted | tok/s | speedup | round cost | '
           'refresh s/gen (share) | M | precision | recall | identical | note |\n'
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')


def _method_line(point: dict, label: str) -> str:
  r = point['methods'][label]
  identical = (f"{r['identical']}/{r['identical'] + len(r['mismatches'])}"
               if 'identical' in r else '')
  notes = ['degenerate text: do not quote'] if point['degenerate'] else []
  if r.get('mismatches'):
    notes.append('TOKENS DIFFER from plain decoding: a bug')
  note = '; '.join(notes)
  return (f"| {point['epsilon']:g} | {label} | {_fmt(r['tau'])} | {_fmt(r['drafts_per_round'])} "
          f"| {_fmt(r['drafting_fraction'])} | {_fmt(r['tokens_per_second'], '.1f')} | "
          f"{_fmt(r['speedup'])}x | {_fmt(r['round_cost'])} | "
          f"{_fmt(r['refresh_seconds_per_generation'], '.3f')} "
          f"({_fmt(100 * (r['refresh_share'] or 0), '.0f')}%) | {_fmt(r['mean_skip'], '.1f')} | "
          f"{_fmt(r['precision'])} | {_fmt(r['recall'])} | {identical} | {note} |")


def _diversity_line(point: dict) -> str:
  d = point['diversity']
  return (f"| {point['epsilon']:g} | {point['dropped_prompts']} | "
          f"{min(x['distinct_ratio'] for x in d):.2f} | "
          f"{min(x['distinct_3gram_ratio'] for x in d):.2f} | "
          f"{max(x['longest_repeat'] for x in d)} | {max(x['lag_match'] for x in d):.2f} | "
          f"{'yes' if point['degenerate'] else 'no'} | "
          f"{point['plain_repeated']}/{len(point['prompts'])} |")


_DIVERSITY_HEADER = ('| eps | candidates dropped | distinct tokens (min) | '
                     'distinct 3-grams (min) | longest repeat (max) | lag match (max) | '
                     'degenerate | plain decoding repeated itself |\n'
                     '|---|---|---|---|---|---|---|---|')


def point_markdown(point: dict) -> str:
  """One point's method table."""
  return '\n'.join([_HEADER] + [_method_line(point, label) for label in point['methods']])


def markdown(sweep: dict) -> str:
  """The sweep as markdown: every point's methods, then plain decoding's text diversity."""
  lines = [_HEADER] + [_method_line(p, label) for p in sweep['points'] for label in p['methods']]
  lines += ['', 'Plain decoding\'s text, worst timed prompt per point (candidate prompts whose '
            'plain text was degenerate were dropped before timing):', '', _DIVERSITY_HEADER]
  lines += [_diversity_line(p) for p in sweep['points']]
  return '\n'.join(lines)


def plot(sweep: dict, path: str | os.PathLike) -> None:
  """Speedup against tau, one line per method over the non-degenerate points, beside the
  CLaSp paper's overall speedups drawn across their tau ranges."""
  figure = Figure(figsize=(10.0, 5.0), layout='tight')
  FigureCanvasAgg(figure)
  ax = figure.add_subplot()
  points = sorted((p for p in sweep['points'] if not p['degenerate']),
                  key=lambda p: p['epsilon'])
  labels = [m['label'] for m in sweep['methods'] if m['label'] != BASELINE]
  for label in labels:
    rows = [p['methods'][label] for p in points]
    ax.plot([r['tau'] for r in rows], [r['speedup'] for r in rows], marker='o', label=label)
  for name, paper in PAPER.items():
    low, high = paper['tau']
    ax.hlines(paper['speedup'], low, high, linestyles='dotted', linewidth=2,
              color='black' if name.endswith('70b') else 'grey',
              label=f"CLaSp paper, {name}: {paper['speedup']}x over tau {low}-{high}")
  ax.axhline(1.0, color='black', linewidth=0.8)
  ax.set_xlabel('tau (tokens per round)')
  ax.set_ylabel('speedup over plain decoding (x)')
  dropped = len(sweep['points']) - len(points)
  ax.set_title(f"Planted {sweep['config']['num_layers']}-layer model, epsilon sweep"
               + (f' ({dropped} degenerate point(s) left out)' if dropped else ''))
  ax.legend(loc='upper left', bbox_to_anchor=(1.0, 1.0), fontsize=8)
  figure.savefig(path, dpi=150)
