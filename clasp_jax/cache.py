"""A length-indexed key/value cache.

Every layer's keys and values live in one stacked array, read by layer index. A
forward pass over T tokens writes rows [length, length + T) and advances `length`; rejecting
speculative tokens only moves `length` back (`rollback`), since rows past it are masked out
and overwritten by the next write.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from clasp_jax.attention import ATTENTION_BLOCK
from clasp_jax.config import LlamaConfig


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer.

  Attributes:
    k_LBSKh: keys, [L, B, S, KV, head_dim].
    v_LBSKh: values, [L, B, S, KV, head_dim].
    length: int32 scalar, the number of valid rows (shared by the batch).
  """

  k_LBSKh: jax.Array
  v_LBSKh: jax.Array
  length: jax.Array

  @property
  def max_len(self) -> int:
    """S, the static capacity."""
    return self.k_LBSKh.shape[2]

  def rollback(self, length: jax.Array | int) -> KVCache:
    """Returns the cache truncated to `length` valid rows (no data moves)."""
    return self.replace(length=jnp.asarray(length, jnp.int32))


def init_cache(config: LlamaConfig, max_len: int, *, batch: int = 1,
               dtype: jnp.dtype = jnp.float32) -> KVCache:
  """An empty cache with room for at least `max_len` positions: the capacity is rounded up to
  a multiple of `ATTENTION_BLOCK`, the unit attention reads the cache in."""
  capacity = -(-max_len // ATTENTION_BLOCK) * ATTENTION_BLOCK
  shape = (config.num_layers, batch, capacity, config.num_kv_heads, config.head_dim)
  return KVCache(k_LBSKh=jnp.zeros(shape, dtype), v_LBSKh=jnp.zeros(shape, dtype),
                 length=jnp.zeros((), jnp.int32))
