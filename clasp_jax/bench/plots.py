"""Figures of a Spec-Bench run: speedup and tau per group, and one prompt's skip sets.

Figures are built with matplotlib's object API on an Agg canvas, never through pyplot: nothing
opens a window or needs a display, and no global backend is set for the caller. A method that
never drafted is labelled so in the bar charts, and a skip-set heatmap without a drafting round
says so in words rather than showing an empty image.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
import numpy as np

from clasp_jax.bench import specbench

SKIP_METHOD = 'clasp'
_DPI = 150
_BAR_AREA = 0.8  # The share of a group's width its bars take.


def _figure(width: float, height: float) -> Figure:
  """An empty figure on an Agg canvas, laid out tightly when saved."""
  figure = Figure(figsize=(width, height), layout='tight')
  FigureCanvasAgg(figure)
  return figure


def _save(figure: Figure, path: str | os.PathLike) -> None:
  figure.savefig(path, dpi=_DPI)


def _grouped_bars(summary: dict[str, Any], key: str, ylabel: str, title: str) -> Figure:
  """One bar per method (vanilla left out) in each group, against a dashed line at 1.0.

  Vanilla is 1.0 on both speedup and tau, so the line is the baseline either way. A method that
  never drafted says so in the legend (see `specbench.decoded_plainly`).
  """
  methods = [m for m in summary if m != specbench.BASELINE]
  groups = list(summary[specbench.BASELINE])
  figure = _figure(max(8.0, 1.6 * len(groups)), 4.8)
  ax = figure.add_subplot()
  width = _BAR_AREA / max(len(methods), 1)
  x = np.arange(len(groups))
  for i, method in enumerate(methods):
    values = [summary[method][g][key] for g in groups]
    plain = specbench.decoded_plainly(method, summary[method][specbench.OVERALL])
    label = f'{method} (no round drafted)' if plain else method
    bars = ax.bar(x + (i - (len(methods) - 1) / 2) * width, values, width, label=label)
    ax.bar_label(bars, fmt='%.2f', fontsize=7, padding=2, rotation=90)
  ax.axhline(1.0, color='black', linestyle='--', linewidth=1, label=specbench.BASELINE)
  ax.set_xticks(x, [g.replace('_', ' ') for g in groups])
  ax.set_xlabel('Spec-Bench group')
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.set_ylim(0, ax.get_ylim()[1] * 1.12)  # Room for the value labels.
  ax.legend(loc='upper left', bbox_to_anchor=(1.0, 1.0))
  return figure


def speedup_figure(summary: dict[str, Any]) -> Figure:
  """Grouped bars of each method's speedup over vanilla, per group and overall."""
  return _grouped_bars(summary, 'speedup', 'speedup over vanilla (x)',
                       'Speedup over vanilla decoding')


def tau_figure(summary: dict[str, Any]) -> Figure:
  """Grouped bars of each method's tau (tokens committed per round), per group and overall."""
  return _grouped_bars(summary, 'tau', 'tau (tokens per round)',
                       'Mean tokens committed per round (tau)')


def plot_speedup(summary: dict[str, Any], path: str | os.PathLike) -> None:
  """Saves `speedup_figure` to `path`."""
  _save(speedup_figure(summary), path)


def plot_tau(summary: dict[str, Any], path: str | os.PathLike) -> None:
  """Saves `tau_figure` to `path`."""
  _save(tau_figure(summary), path)


def _first_turn(record: dict) -> tuple[list, list, np.ndarray]:
  """An answer's first turn: the skipped layers' indices per round, its accept lengths, and
  each round's draft source ('plain', 'lookup' or 'skip').

  Answer files written before draft sources were recorded count a round that drafted as a
  layer-skip round, and, before draft lengths, a round as drafting when it skipped layers.
  """
  skip_sets = record['choices'][0]['skip_sets'][0]
  accepted = specbench.turn_accept_lengths(record)[0]
  draft_sources = specbench.turn_draft_sources(record)
  if draft_sources is not None:
    return skip_sets, accepted, np.asarray(draft_sources[0], dtype=object)
  draft_lengths = specbench.turn_draft_lengths(record)
  if draft_lengths is not None:
    drafting_R = np.asarray(draft_lengths[0], int) > 0
  else:
    drafting_R = np.zeros(len(accepted), bool)
    drafting_R[:len(skip_sets)] = [bool(layers) for layers in skip_sets]
  return skip_sets, accepted, np.where(drafting_R, 'skip', 'plain').astype(object)


def _answer(answer_file: str | os.PathLike, question_id: Any) -> dict:
  """The answer to `question_id` in an answer file.

  Raises:
    ValueError: when the answer file has no answer to `question_id`.
  """
  for record in specbench.read_answers(answer_file):
    if record['question_id'] == question_id:
      return record
  raise ValueError(f'{answer_file} has no answer to question {question_id}')


def _skip_matrix(skip_sets: Sequence[Sequence[int]], rounds: int, num_layers: int) -> np.ndarray:
  """bool[rounds, L] from per-round skipped-layer indices ([] for a turn that skipped none)."""
  skip_RL = np.zeros((rounds, num_layers), bool)
  for r, layers in enumerate(skip_sets):
    skip_RL[r, layers] = True
  return skip_RL


# Heatmap cells: a layer a skip draft ran, one it skipped, a round drafted by prompt lookup (no
# layer ran), a round that decoded plainly.
_CELL_COLORS = ('white', 'black', 'lightblue', 'lightyellow')
_RAN, _SKIPPED, _LOOKUP_ROUND, _PLAIN_ROUND = range(4)


def skip_heatmap_figure(answer_file: str | os.PathLike, question_id: Any,
                        num_layers: int) -> Figure:
  """One prompt's first turn: the skip set of each round (skipped layers dark; rounds that
  drafted by prompt lookup blue, rounds that decoded plainly yellow) beside the tokens that
  round committed, rounds going down on a shared axis. Without a drafting round, the heatmap
  says so in words instead.

  Raises:
    ValueError: when the answer file has no answer to `question_id`, or its first turn no
      rounds (the prefill's token was the whole answer).
  """
  skip_sets, accepted, source_R = _first_turn(_answer(answer_file, question_id))
  drafting_R = source_R != 'plain'
  rounds = len(accepted)
  if not rounds:
    raise ValueError(f'question {question_id} of {answer_file}: the first turn has no rounds')
  figure = _figure(10.0, 6.0)
  heat_ax, bar_ax = figure.subplots(1, 2, sharey=True, width_ratios=(3, 1))
  heat_ax.set_xlabel('layer')
  heat_ax.set_ylabel('round')
  heat_ax.set_xlim(-0.5, num_layers - 0.5)
  if drafting_R.any():
    cells_RL = _skip_matrix(skip_sets, rounds, num_layers).astype(int)
    cells_RL[source_R == 'lookup'] = _LOOKUP_ROUND
    cells_RL[source_R == 'plain'] = _PLAIN_ROUND
    heat_ax.imshow(cells_RL, cmap=matplotlib.colors.ListedColormap(_CELL_COLORS), vmin=-0.5,
                   vmax=len(_CELL_COLORS) - 0.5, aspect='auto', interpolation='nearest')
    others = [f'{color}: {n} {kind} rounds' for color, kind, n in (
        ('blue', 'lookup', (source_R == 'lookup').sum()),
        ('yellow', 'plain', (source_R == 'plain').sum())) if n]
    heat_ax.set_title('Skipped layers per round (dark: skipped' + ''.join(
        f'; {o}' for o in others) + ')')
    drafted = ''
  else:
    heat_ax.text(0.5, 0.5, 'No round drafted:\nevery round decoded plainly,\nskipping no layer',
                 transform=heat_ax.transAxes, ha='center', va='center', fontsize=14)
    heat_ax.set_title('Skipped layers per round: none')
    drafted = ': no round drafted'
  bar_ax.barh(np.arange(rounds), accepted, height=1.0, color='tab:blue')
  bar_ax.set_ylim(rounds - 0.5, -0.5)  # Round 0 on top, each row level with its bar.
  bar_ax.set_xlabel('tokens committed')
  bar_ax.set_title(f'Accepted length (tau {np.mean(accepted):.2f})')
  bar_ax.set_xlim(0, max(accepted) + 0.5)
  for axis in (heat_ax.xaxis, heat_ax.yaxis, bar_ax.xaxis):
    axis.set_major_locator(MaxNLocator(integer=True))  # Layers, rounds, tokens: no fractions.
  figure.suptitle(f'{Path(answer_file).stem}, question {question_id}, first turn '
                  f'({rounds} rounds{drafted})')
  return figure


def plot_skip_heatmap(answer_file: str | os.PathLike, question_id: Any,
                      path: str | os.PathLike, num_layers: int) -> None:
  """Saves `skip_heatmap_figure` to `path`.

  Raises:
    ValueError: as `skip_heatmap_figure`.
  """
  _save(skip_heatmap_figure(answer_file, question_id, num_layers), path)


def _most_drafted_first_turn(answer_file: Path) -> tuple[Any, int]:
  """The question whose first turn drafted with layers skipped in the most rounds (then: took
  the most rounds), in file order among equals: its id and its rounds."""
  def drafting_and_rounds(record: dict) -> tuple[int, int]:
    _, accepted, source_R = _first_turn(record)
    return int((source_R == 'skip').sum()), len(accepted)
  best = max(specbench.read_answers(answer_file), key=drafting_and_rounds)
  return best['question_id'], drafting_and_rounds(best)[1]


def write_plots(out_dir: str | os.PathLike, summary: dict[str, Any], methods: Sequence[str],
                num_layers: int) -> list[Path]:
  """Writes speedup.png, tau.png and, with clasp among the methods, skip_heatmap.png.

  The heatmap shows the clasp first turn that drafted in the most rounds (the longest one when
  none drafted: its figure then says so); it is left out when that turn has no rounds, i.e.
  every first turn was a single token.

  Returns:
    The paths written.
  """
  out_dir = Path(out_dir)
  paths = [out_dir / 'speedup.png', out_dir / 'tau.png']
  plot_speedup(summary, paths[0])
  plot_tau(summary, paths[1])
  if SKIP_METHOD not in methods:
    return paths
  answer_file = specbench.answer_path(out_dir, SKIP_METHOD)
  question_id, rounds = _most_drafted_first_turn(answer_file)
  if rounds:
    paths.append(out_dir / 'skip_heatmap.png')
    plot_skip_heatmap(answer_file, question_id, paths[-1], num_layers)
  return paths
