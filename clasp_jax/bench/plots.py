"""Figures of a Spec-Bench run: speedup and tau per group, and one prompt's skip sets.

Figures are built with matplotlib's object API on an Agg canvas, never through pyplot: nothing
opens a window or needs a display, and no global backend is set for the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
from pathlib import Path
from typing import Any

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


def _grouped_bars(summary: dict[str, Any], key: str, ylabel: str, title: str,
                  path: str | os.PathLike) -> None:
  """One bar per method (vanilla left out) in each group, against a dashed line at 1.0.

  Vanilla is 1.0 on both speedup and tau, so the line is the baseline either way.
  """
  methods = [m for m in summary if m != specbench.BASELINE]
  groups = list(summary[specbench.BASELINE])
  figure = _figure(max(8.0, 1.6 * len(groups)), 4.8)
  ax = figure.add_subplot()
  width = _BAR_AREA / max(len(methods), 1)
  x = np.arange(len(groups))
  for i, method in enumerate(methods):
    values = [summary[method][g][key] for g in groups]
    bars = ax.bar(x + (i - (len(methods) - 1) / 2) * width, values, width, label=method)
    ax.bar_label(bars, fmt='%.2f', fontsize=7, padding=2, rotation=90)
  ax.axhline(1.0, color='black', linestyle='--', linewidth=1, label=specbench.BASELINE)
  ax.set_xticks(x, [g.replace('_', ' ') for g in groups])
  ax.set_xlabel('Spec-Bench group')
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.set_ylim(0, ax.get_ylim()[1] * 1.12)  # Room for the value labels.
  ax.legend(loc='upper left', bbox_to_anchor=(1.0, 1.0))
  _save(figure, path)


def plot_speedup(summary: dict[str, Any], path: str | os.PathLike) -> None:
  """Grouped bars of each method's speedup over vanilla, per group and overall."""
  _grouped_bars(summary, 'speedup', 'speedup over vanilla (x)',
                'Speedup over vanilla decoding', path)


def plot_tau(summary: dict[str, Any], path: str | os.PathLike) -> None:
  """Grouped bars of each method's tau (tokens committed per round), per group and overall."""
  _grouped_bars(summary, 'tau', 'tau (tokens per round)',
                'Mean tokens committed per round (tau)', path)


def _first_turn(answer_file: str | os.PathLike, question_id: Any) -> tuple[list, list]:
  """A question's first turn: the skipped layers' indices per round, and its accept lengths.

  Raises:
    ValueError: when the answer file has no answer to `question_id`.
  """
  for record in specbench.read_answers(answer_file):
    if record['question_id'] == question_id:
      return record['choices'][0]['skip_sets'][0], specbench.turn_accept_lengths(record)[0]
  raise ValueError(f'{answer_file} has no answer to question {question_id}')


def _skip_matrix(skip_sets: Sequence[Sequence[int]], rounds: int, num_layers: int) -> np.ndarray:
  """bool[rounds, L] from per-round skipped-layer indices ([] for a turn that skipped none)."""
  skip_RL = np.zeros((rounds, num_layers), bool)
  for r, layers in enumerate(skip_sets):
    skip_RL[r, layers] = True
  return skip_RL


def plot_skip_heatmap(answer_file: str | os.PathLike, question_id: Any,
                      path: str | os.PathLike, num_layers: int) -> None:
  """One prompt's first turn: the skip set of each round (skipped layers dark) beside the
  tokens that round committed, rounds going down on a shared axis.

  Raises:
    ValueError: when the answer file has no answer to `question_id`, or its first turn no
      rounds (the prefill's token was the whole answer).
  """
  skip_sets, accepted = _first_turn(answer_file, question_id)
  rounds = len(accepted)
  if not rounds:
    raise ValueError(f'question {question_id} of {answer_file}: the first turn has no rounds')
  figure = _figure(10.0, 6.0)
  heat_ax, bar_ax = figure.subplots(1, 2, sharey=True, width_ratios=(3, 1))
  heat_ax.imshow(_skip_matrix(skip_sets, rounds, num_layers), cmap='Greys', vmin=0, vmax=1,
                 aspect='auto', interpolation='nearest')
  heat_ax.set_xlabel('layer')
  heat_ax.set_ylabel('round')
  heat_ax.set_title('Skipped layers per round (dark: skipped)')
  bar_ax.barh(np.arange(rounds), accepted, height=1.0, color='tab:blue')
  bar_ax.set_ylim(rounds - 0.5, -0.5)  # Round 0 on top, each row level with its bar.
  bar_ax.set_xlabel('tokens committed')
  bar_ax.set_title(f'Accepted length (tau {np.mean(accepted):.2f})')
  bar_ax.set_xlim(0, max(accepted) + 0.5)
  for axis in (heat_ax.xaxis, heat_ax.yaxis, bar_ax.xaxis):
    axis.set_major_locator(MaxNLocator(integer=True))  # Layers, rounds, tokens: no fractions.
  figure.suptitle(f'{Path(answer_file).stem}, question {question_id}, first turn '
                  f'({rounds} rounds)')
  _save(figure, path)


def _longest_first_turn(answer_file: Path, group: str) -> tuple[Any, int]:
  """The question of `group` whose first turn took the most rounds: its id and its rounds."""
  records = [r for r in specbench.read_answers(answer_file)
             if specbench.group_of(r['category']) == group]
  longest = max(records, key=lambda r: r['choices'][0]['decoding_steps'][0])
  return longest['question_id'], longest['choices'][0]['decoding_steps'][0] - 1


def write_plots(out_dir: str | os.PathLike, summary: dict[str, Any], methods: Sequence[str],
                num_layers: int) -> list[Path]:
  """Writes speedup.png, tau.png and, with clasp among the methods, skip_heatmap.png.

  The heatmap shows clasp's longest first turn (in rounds) in the summary's first group; it is
  left out when that turn has no rounds, i.e. every first turn there was a single token.

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
  question_id, rounds = _longest_first_turn(answer_file, next(iter(summary[SKIP_METHOD])))
  if rounds:
    paths.append(out_dir / 'skip_heatmap.png')
    plot_skip_heatmap(answer_file, question_id, paths[-1], num_layers)
  return paths
