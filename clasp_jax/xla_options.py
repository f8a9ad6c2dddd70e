"""The platform the model's programs are built for, and their XLA options there."""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import contextvars

import jax

#: On a CPU: YNNPACK's fusions off. On a 2-core AVX2 CPU they made plain decoding of
#: SmolLM2-135M 1.05-1.33x slower a token, 1.25x over Spec-Bench prompts
#: (docs/results/cpu/ynn_fusions/).
CPU_COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}


def compiler_options() -> dict[str, str | bool] | None:
  """`jax.jit`'s `compiler_options` for a program of the default backend (None: XLA's
  defaults)."""
  if jax.default_backend() != 'cpu':
    return None
  return CPU_COMPILER_OPTIONS


_LOWERING_FOR: contextvars.ContextVar[str | None] = contextvars.ContextVar('lowering_for',
                                                                          default=None)


def platform() -> str:
  """The platform of the programs being traced, for the model's choices by platform (compare
  with 'cpu' only): this machine's backend, or the one `lowering_for` names."""
  return _LOWERING_FOR.get() or jax.default_backend()


@contextlib.contextmanager
def lowering_for(name: str) -> Iterator[None]:
  """Traces the programs inside as platform `name` ('cpu', 'cuda', 'rocm' or 'tpu') runs them,
  whatever this machine's backend (`Decoder.lower`)."""
  token = _LOWERING_FOR.set(name)
  try:
    yield
  finally:
    _LOWERING_FOR.reset(token)
