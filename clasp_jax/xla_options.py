"""XLA options of the programs that run the model, chosen by backend."""

from __future__ import annotations

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
