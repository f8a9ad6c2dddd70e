"""The `hf` method: Hugging Face transformers' greedy `generate` in PyTorch.

What most users run today, so the benchmark's reference outside JAX. It loads the checkpoint
being benchmarked (transformers dequantises a GGUF file, which needs the `accelerate` package;
a Hugging Face folder is read as is) in float32 and decodes greedily. torch is imported only
here, and only when this method is asked for.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
import time
from typing import Any

import numpy as np

from clasp_jax.engine import Generation
from clasp_jax.weights import LoadedModel


@dataclasses.dataclass(frozen=True)
class HFReference:
  """A transformers `LlamaForCausalLM` behind `Decoder.generate`'s interface.

  Attributes:
    hf_model: the torch model.
    tokenizer: the benchmarked model's tokenizer (decodes the answers identically).
    eos_token_ids: the ids that end a generation, as the JAX decoders use them.
    num_layers: L (for the empty skip-set record).
    device: the torch device the model is on.
  """

  hf_model: Any
  tokenizer: Any
  eos_token_ids: tuple[int, ...]
  num_layers: int
  device: str

  def generate(self, prompt_ids: list[int], max_new_tokens: int, seed: int = 0) -> Generation:
    """Greedy generation, timed from the prompt ids to the last token (`seed` is unused)."""
    del seed  # Greedy decoding draws nothing.
    import torch  # pylint: disable=g-import-not-at-top
    input_ids = torch.tensor([prompt_ids], device=self.device)
    eos = list(self.eos_token_ids) or None
    start = time.perf_counter()
    with torch.inference_mode():
      output = self.hf_model.generate(
          input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
          do_sample=False, eos_token_id=eos, pad_token_id=eos[0] if eos else None)
    tokens = output[0, len(prompt_ids):].tolist()
    wall_time = time.perf_counter() - start
    rounds = max(len(tokens) - 1, 0)  # The first token comes from the prefill, as in Decoder.
    return Generation(
        token_ids=tokens, text=self.tokenizer.decode(tokens, skip_special_tokens=True),
        prompt_tokens=len(prompt_ids), wall_time=wall_time, compile_seconds=0.0,
        accept_lengths=[1] * rounds, draft_lengths=[0] * rounds,
        draft_sources=['plain'] * rounds,
        skip_sets=np.zeros((rounds, self.num_layers), bool), refresh_times=[])


def load_reference(model: LoadedModel) -> HFReference:
  """Loads `model`'s checkpoint (`model.source`: a GGUF file or an HF folder) into transformers.

  Raises:
    ValueError: without torch, or when the source is neither a GGUF file nor a folder.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f'method hf needs PyTorch and transformers (pip install torch '
                     f'accelerate): {e}') from None
  source = Path(str(model.source))
  if source.is_file() and source.suffix == '.gguf':
    location = dict(pretrained_model_name_or_path=source.parent, gguf_file=source.name)
  elif source.is_dir():
    location = dict(pretrained_model_name_or_path=source)
  else:
    raise ValueError(f'method hf needs a GGUF file or a Hugging Face folder; the model came '
                     f'from {model.source}')
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  hf_model = transformers.LlamaForCausalLM.from_pretrained(**location, dtype=torch.float32)
  return HFReference(hf_model=hf_model.to(device).eval(), tokenizer=model.tokenizer,
                     eos_token_ids=tuple(model.config.eos_token_ids),
                     num_layers=model.config.num_layers, device=device)
