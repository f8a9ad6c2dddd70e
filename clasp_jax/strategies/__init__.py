"""Decoding strategies, each a small frozen dataclass beside the others.

`build` turns the CLI's flat settings into a strategy for a given model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from clasp_jax import widths
from clasp_jax.config import LlamaConfig
from clasp_jax.strategies.adaptive import AdaptiveClasp, best_num_skip
from clasp_jax.strategies.base import Drafts, Policy, SchedulePolicy, Segment, Strategy
from clasp_jax.strategies.clasp import Clasp, clasp_dp
from clasp_jax.strategies.conflayers import ConfLayers
from clasp_jax.strategies.layer_skip import evenly_spaced_skip_set
from clasp_jax.strategies.pld import PromptLookup
from clasp_jax.strategies.static import StaticSkip
from clasp_jax.strategies.vanilla import Vanilla

METHODS = ('vanilla', 'clasp', 'static', 'pld', 'conflayers')

# Defaults measured on SmolLM2-135M (docs/results/): see README "Choosing M, K, DET, LOI".
#: K where a pass has room for more: the GPUs' and TPUs' (`default_num_draft_tokens`).
MAX_DEFAULT_NUM_DRAFT_TOKENS = 8
DEFAULT_DRAFT_EXIT_THRESHOLD = 0.7
DEFAULT_LOI = 4
DEFAULT_SKIP_RATIO = 0.1
# --skip_layers=auto: M is searched on a grid of tenths of L up to 0.6 L, starting at 0.2 L.
AUTO_SKIP_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
AUTO_INITIAL_SKIP_RATIO = 0.2


def default_num_draft_tokens(pass_width: int | None = None) -> int:
  """K when it is not chosen: as many drafts as one pass of `pass_width` rows verifies
  (None: the platform's width), up to `MAX_DEFAULT_NUM_DRAFT_TOKENS`: 8 on GPUs and TPUs, 2 on
  a CPU. More would take a second pass per verify, which on a CPU costs what a plain step
  does; at width 1, 1 (drafting there only loses: `--pass_width=1` is for plain decoding)."""
  width = widths.default_pass_width() if pass_width is None else pass_width
  return max(1, min(MAX_DEFAULT_NUM_DRAFT_TOKENS, width - 1))


def num_skip_for(config: LlamaConfig, skip_layers: int | str | None,
                 skip_ratio: float | None) -> int:
  """M from an explicit count or a ratio of L (rounded), validated against the model."""
  if skip_layers is not None and skip_ratio is not None:
    raise ValueError('give skip_layers or skip_ratio, not both')
  if skip_layers == 'auto':
    skip_layers = None
  L = config.num_layers
  if skip_layers is None:
    ratio = DEFAULT_SKIP_RATIO if skip_ratio is None else skip_ratio
    if not 0 <= ratio < 1:
      raise ValueError(f'skip_ratio must be in [0, 1), got {ratio}')
    skip_layers = round(ratio * L)
  if not 0 <= skip_layers < L:
    raise ValueError(f'skip_layers (M) must be in [0, L) = [0, {L}), got {skip_layers}')
  return skip_layers


def auto_skip_grid(config: LlamaConfig) -> tuple[int, ...]:
  """The values of M `--skip_layers=auto` chooses from: tenths of L up to 0.6 L (at least 1,
  fewer than L, without repeats)."""
  L = config.num_layers
  return tuple(sorted({min(L - 1, max(1, round(r * L))) for r in AUTO_SKIP_RATIOS}))


def auto_clasp(config: LlamaConfig, *, num_draft_tokens: int | None = None,
               draft_exit_threshold: float = DEFAULT_DRAFT_EXIT_THRESHOLD,
               loi: int = DEFAULT_LOI, lookup: bool = True,
               cost_cache_dir: str | None = None, dp_in_verify: bool = True) -> AdaptiveClasp:
  """CLaSp with M chosen online (`--skip_layers=auto`), its grid of M scaled to L (K: the
  platform's default when None)."""
  if num_draft_tokens is None:
    num_draft_tokens = default_num_draft_tokens()
  grid = auto_skip_grid(config)
  initial = min(grid, key=lambda m: abs(m - AUTO_INITIAL_SKIP_RATIO * config.num_layers))
  return AdaptiveClasp(candidates=grid, initial_skip_layers=initial,
                       num_draft_tokens=num_draft_tokens,
                       draft_exit_threshold=draft_exit_threshold, loi=loi, lookup=lookup,
                       cost_cache_dir=cost_cache_dir, dp_in_verify=dp_in_verify)


def build(method: str, config: LlamaConfig, *, skip_layers: int | str | None = None,
          skip_ratio: float | None = None, skip_set: tuple[int, ...] | None = None,
          num_draft_tokens: int | None = None, pass_width: int | None = None,
          draft_exit_threshold: float = DEFAULT_DRAFT_EXIT_THRESHOLD,
          loi: int = DEFAULT_LOI, lookup: bool = True, cost_cache_dir: str | None = None,
          conflayers_settings: Mapping[str, Any] | None = None,
          dp_in_verify: bool = True) -> Strategy:
  """The strategy `method` with the given settings, validated against `config`.

  For clasp, `skip_layers='auto'` (the default when neither skip_layers nor skip_ratio is
  given) chooses M online; an integer or a ratio fixes it. `lookup` (clasp only) takes a
  round's drafts from the context when it has an n-gram match and drafts with layers skipped
  only otherwise; False is the paper's CLaSp. `dp_in_verify` (clasp only) fills the DP's
  table inside the verify passes (`Clasp.dp_in_verify`). conflayers searches its own skip
  sets (the M settings do not apply); `conflayers_settings` overrides `ConfLayers` fields
  besides K and DET. K unset: `default_num_draft_tokens(pass_width)`, what one pass of the
  decoder's width verifies (`pass_width` None: the platform's).

  Raises:
    ValueError: for an unknown method or settings that do not fit the model.
  """
  if isinstance(skip_layers, str) and skip_layers != 'auto':
    raise ValueError(f"skip_layers must be an integer or 'auto', got {skip_layers!r}")
  if num_draft_tokens is None:
    num_draft_tokens = default_num_draft_tokens(pass_width)
  if method == 'vanilla':
    strategy = Vanilla()
  elif method == 'clasp':
    if skip_set is not None:
      raise ValueError('--skip_set fixes the skip set: use it with method static, not clasp')
    if skip_layers == 'auto' or (skip_layers is None and skip_ratio is None):
      if skip_ratio is not None:
        raise ValueError("skip_layers='auto' chooses M itself: drop skip_ratio")
      strategy = auto_clasp(config, num_draft_tokens=num_draft_tokens,
                            draft_exit_threshold=draft_exit_threshold, loi=loi, lookup=lookup,
                            cost_cache_dir=cost_cache_dir, dp_in_verify=dp_in_verify)
      strategy.validate(config)
      return strategy
    strategy = Clasp(num_skip=num_skip_for(config, skip_layers, skip_ratio),
                     num_draft_tokens=num_draft_tokens,
                     draft_exit_threshold=draft_exit_threshold, loi=loi, lookup=lookup,
                     dp_in_verify=dp_in_verify)
  elif method == 'static':
    if skip_set is None:
      skip_set = evenly_spaced_skip_set(config, num_skip_for(config, skip_layers, skip_ratio))
    strategy = StaticSkip(skip_layers=tuple(skip_set), num_draft_tokens=num_draft_tokens,
                          draft_exit_threshold=draft_exit_threshold)
  elif method == 'pld':
    strategy = PromptLookup(num_draft_tokens=num_draft_tokens)
  elif method == 'conflayers':
    strategy = ConfLayers(num_draft_tokens=num_draft_tokens,
                          draft_exit_threshold=draft_exit_threshold,
                          **(conflayers_settings or {}))
  else:
    raise ValueError(f'unknown method {method!r}; choose from {", ".join(METHODS)}')
  strategy.validate(config)
  return strategy


__all__ = ['METHODS', 'AdaptiveClasp', 'Clasp', 'ConfLayers', 'Drafts', 'Policy', 'PromptLookup',
           'SchedulePolicy', 'Segment', 'StaticSkip', 'Strategy', 'Vanilla', 'auto_clasp',
           'auto_skip_grid', 'best_num_skip', 'build', 'clasp_dp', 'default_num_draft_tokens',
           'evenly_spaced_skip_set', 'num_skip_for']
