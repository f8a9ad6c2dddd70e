"""clasp_jax: lossless, training-free self-speculative decoding (CLaSp) for LLaMA in JAX.

Typical use:

  import clasp_jax
  model = clasp_jax.load()              # the embedded SmolLM2-135M-Instruct
  out = clasp_jax.generate(model, 'Why is the sky blue?', chat=True, method='clasp')
  print(out.text, out.mean_accepted)
"""

import logging
import warnings

import tqdm

# Importing transformers (only `clasp-bench`'s `hf` reference method does) makes two kinds of
# noise that say nothing about this library: a warning that PyTorch was not found, and, in a
# notebook without ipywidgets, tqdm's warning that IProgress was not found (transformers imports
# `tqdm.auto`). Both are dropped, before transformers is first imported, by filters that match
# those two messages and nothing else.
logging.getLogger('transformers').addFilter(
    lambda record: not record.getMessage().startswith('PyTorch was not found'))
warnings.filterwarnings('ignore', message='IProgress not found', category=tqdm.TqdmWarning)

# pylint: disable=g-import-not-at-top,wrong-import-position
from clasp_jax.config import LlamaConfig, RopeScaling
from clasp_jax.engine import Decoder, Generation, enable_compilation_cache
from clasp_jax.generation import encode_prompt, generate, make_decoder
from clasp_jax.sampling import SamplingConfig
from clasp_jax.strategies import METHODS, Clasp, PromptLookup, StaticSkip, Strategy, Vanilla
from clasp_jax.weights import LoadedModel, load

__all__ = [
    'METHODS', 'Clasp', 'Decoder', 'Generation', 'LlamaConfig', 'LoadedModel', 'PromptLookup',
    'RopeScaling', 'SamplingConfig', 'StaticSkip', 'Strategy', 'Vanilla',
    'enable_compilation_cache', 'encode_prompt', 'generate', 'load', 'make_decoder',
]
