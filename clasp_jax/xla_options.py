"""XLA options of the programs that run the model, chosen by backend and layer layout."""

from __future__ import annotations

import jax

#: On a CPU: YNNPACK's fusions off. On a 2-core AVX2 CPU they made plain decoding of
#: SmolLM2-135M 1.05-1.33x slower a token, 1.25x over Spec-Bench prompts
#: (docs/results/cpu/ynn_fusions/).
CPU_COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}

#: On a CPU, programs over per-layer weight buffers (`model.unstack_layers`) also take copy
#: insertion's region analysis. Without it XLA copies the whole KV cache four times a plain step
#: around the unrolled layers' attention loops (SmolLM2-135M's 2048-position cache: 13.5 ms of
#: a 49 ms step on a 2-core Xeon; docs/results/cpu/width_1_per_layer/). Over the stacked
#: layout, whose loop has no such copies, it made plain decoding 8% slower there.
CPU_PER_LAYER_OPTIONS = {**CPU_COMPILER_OPTIONS,
                         'xla_cpu_copy_insertion_use_region_analysis': True}


def compiler_options(per_layer: bool = False) -> dict[str, str | bool] | None:
  """`jax.jit`'s `compiler_options` for a program of the default backend over stacked or
  per-layer weights (None: XLA's defaults)."""
  if jax.default_backend() != 'cpu':
    return None
  return CPU_PER_LAYER_OPTIONS if per_layer else CPU_COMPILER_OPTIONS
