"""An on-disk cache of converted checkpoints, so a second load skips dequantising and transposing.

Each entry is a folder named after the source and a hash of (absolute path, size and mtime of its
files, dtype, format version): editing or replacing the source starts a new entry. It holds the
params pytree as an orbax checkpoint, the tokenizer as tokenizer.json, where it came from as
source.json, and the LlamaConfig as config.json, written last so that a half-written entry is
never read. Writing an entry removes the entries of the same source name that no load can reach
again (their source changed in place, or is gone, as a deleted virtualenv's packaged model is),
so that reinstalling does not leave a converted copy behind each time.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from clasp_jax.config import LlamaConfig
from clasp_jax.config import RopeScaling
from clasp_jax.tokenizer import Tokenizer

# Bump when the conversion changes, so stale entries are not reused.
_FORMAT_VERSION = 1
_CONFIG = 'config.json'
_SOURCE = 'source.json'
_PARAMS = 'params'
_TOKENIZER = 'tokenizer'

Loaded = tuple[LlamaConfig, dict[str, Any], Tokenizer]


def _source_files(source_path: str) -> list[str]:
  """The files whose contents define the checkpoint: the file itself, or a folder's files."""
  if os.path.isfile(source_path):
    return [source_path]
  return sorted(p for p in (os.path.join(source_path, n) for n in os.listdir(source_path))
                if os.path.isfile(p))


def cache_key(source_path: str, dtype: np.dtype) -> str:
  """The entry's folder name: `<source name>-<16 hex digits>`."""
  source_path = os.path.abspath(source_path)
  digest = hashlib.sha256(f'{_FORMAT_VERSION}|{source_path}|{np.dtype(dtype).name}'.encode())
  for path in _source_files(source_path):
    stat = os.stat(path)
    digest.update(f'|{os.path.basename(path)}:{stat.st_size}:{stat.st_mtime_ns}'.encode())
  return f'{os.path.basename(source_path.rstrip(os.sep))}-{digest.hexdigest()[:16]}'


def config_from_dict(d: dict[str, Any]) -> LlamaConfig:
  """A LlamaConfig from its `dataclasses.asdict` form, as stored in config.json."""
  scaling = d.get('rope_scaling')
  return LlamaConfig(**{**d, 'rope_scaling': RopeScaling(**scaling) if scaling else None,
                        'eos_token_ids': tuple(d['eos_token_ids'])})


def _save(entry: str, loaded: Loaded, source: dict[str, str]) -> None:
  """Writes an entry; config.json last, as the mark of a complete entry."""
  config, params, tokenizer = loaded
  shutil.rmtree(entry, ignore_errors=True)  # A leftover from an interrupted save.
  os.makedirs(entry)
  with open(os.path.join(entry, _SOURCE), 'w', encoding='utf-8') as f:
    json.dump(source, f)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(entry, _PARAMS), params)
    checkpointer.wait_until_finished()
  tokenizer.save(os.path.join(entry, _TOKENIZER))
  partial = os.path.join(entry, _CONFIG + '.partial')
  with open(partial, 'w', encoding='utf-8') as f:
    json.dump(dataclasses.asdict(config), f, indent=2)
  os.replace(partial, os.path.join(entry, _CONFIG))


def _unreachable(entry: str, source: dict[str, str]) -> bool:
  """Whether no load can reach `entry` (another entry of the same source name) any more: its
  source is gone, or is `source` itself (same path and dtype) since changed; or it is a
  complete entry from before entries recorded their source."""
  try:
    with open(os.path.join(entry, _SOURCE), encoding='utf-8') as f:
      theirs = json.load(f)
  except FileNotFoundError:
    return os.path.isfile(os.path.join(entry, _CONFIG))
  return not os.path.exists(theirs['path']) or theirs == source


def _remove_unreachable(cache_dir: str, entry: str, source: dict[str, str]) -> None:
  """Removes the entries of `entry`'s source name, other than `entry`, that `_unreachable`
  finds."""
  source_name = os.path.basename(entry).rsplit('-', 1)[0]
  for name in os.listdir(cache_dir):
    other = os.path.join(cache_dir, name)
    if (name.rsplit('-', 1)[0] == source_name and other != entry
        and _unreachable(other, source)):
      shutil.rmtree(other, ignore_errors=True)


def _restore(entry: str, check: Callable[[LlamaConfig], None]) -> Loaded:
  """Reads a complete entry, `check`ing its config before its params; params come back as
  host numpy arrays."""
  with open(os.path.join(entry, _CONFIG), encoding='utf-8') as f:
    config = config_from_dict(json.load(f))
  check(config)
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(os.path.join(entry, _PARAMS))
  tokenizer = Tokenizer.from_folder(os.path.join(entry, _TOKENIZER), config.bos_token_id,
                                    config.eos_token_ids)
  return config, params, tokenizer


def cached_load(source_path: str, loader_fn: Callable[[], Loaded], cache_dir: str,
                dtype: np.dtype, check: Callable[[LlamaConfig], None] = lambda _: None
                ) -> Loaded:
  """Loads through the cache: restores a matching entry, else runs `loader_fn` and saves it.

  Args:
    source_path: the checkpoint (a file or folder) that `loader_fn` reads; keys the entry.
    loader_fn: returns (config, params, tokenizer) converted from the source.
    cache_dir: where entries live (created if missing; `~` is expanded).
    dtype: the params dtype `loader_fn` produces; part of the key.
    check: called with a cached entry's config before its params are read (`loader_fn` checks
      a source's itself).

  Returns:
    (config, params, tokenizer); params are host numpy arrays.
  """
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
  entry = os.path.join(cache_dir, cache_key(source_path, dtype))
  if os.path.isfile(os.path.join(entry, _CONFIG)):
    return _restore(entry, check)
  loaded = loader_fn()
  source = dict(path=os.path.abspath(source_path), dtype=np.dtype(dtype).name)
  _save(entry, loaded, source)
  _remove_unreachable(cache_dir, entry, source)
  return loaded
