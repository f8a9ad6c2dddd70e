"""Tests of clasp_jax.tokenizer against transformers' own GGUF tokenizer and a tiny HF one."""

import json
import pathlib
import subprocess
import sys

import gguf
import pytest
import transformers

from clasp_jax.tokenizer import Tokenizer
from clasp_jax.weights import gguf as gguf_weights

# No run of 2+ whitespace characters before a digit: there transformers' GGUF tokenizer is the
# one that differs from llama.cpp (see test_whitespace_run_before_digits_splits_like_llama_cpp).
TEXTS = (
    'Hello, world!',
    'The year 2024 had 366 days; 3.14159 is pi.',
    '  leading spaces,\ttabs,\r\nCRLF and trailing   ',
    '\n\n\nblank lines\n',
    'héllo wörld — naïve café, 日本語のテキスト, emoji 🙂👍🏽',
    "it's they're we've I'm you'll he'd",
    'def f(x):\n    return x ** 2  # code',
    '<|im_start|>user\nspecial tokens inline<|im_end|>',
    '',
)


@pytest.fixture(scope='module')
def smollm2_tokenizer(smollm2) -> Tokenizer:
  """Built by Tokenizer.from_gguf_metadata while loading the embedded GGUF."""
  return smollm2.tokenizer


@pytest.fixture(scope='module')
def transformers_gguf_tokenizer(smollm2_folder_and_name):
  folder, name = smollm2_folder_and_name
  return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)


@pytest.mark.parametrize('text', TEXTS)
def test_ids_match_transformers_gguf_tokenizer(smollm2_tokenizer, transformers_gguf_tokenizer,
                                               text):
  assert smollm2_tokenizer.encode(text) == transformers_gguf_tokenizer.encode(text)


def test_whitespace_run_before_digits_splits_like_llama_cpp(smollm2_tokenizer):
  """llama.cpp's 'smollm' pre-tokenizer (as HF's Digits + ByteLevel) isolates digits first.

  transformers' GGUF rebuild lacks that step (it uses plain GPT-2 splitting), so it alone cuts a
  whitespace run before a digit into single characters, e.g. 'a', 'Ċ', 'Ċ', '1'.
  """
  tokens = [smollm2_tokenizer.backend.id_to_token(i)
            for i in smollm2_tokenizer.encode('a\n\n1  2')]
  assert tokens == ['a', 'ĊĊ', '1', 'ĠĠ', '2']


@pytest.mark.parametrize('text', TEXTS)
def test_round_trip(smollm2_tokenizer, text):
  assert smollm2_tokenizer.decode(smollm2_tokenizer.encode(text)) == text


def test_special_tokens_and_sizes(smollm2_tokenizer):
  assert smollm2_tokenizer.vocab_size == 49152
  assert smollm2_tokenizer.bos_token_id == 1  # <|im_start|>
  assert smollm2_tokenizer.eos_token_ids == (2,)  # <|im_end|>, also the template's end of turn
  assert smollm2_tokenizer.encode('<|im_end|>') == [2]
  assert smollm2_tokenizer.decode([1, 2], skip_special_tokens=True) == ''


def test_chat_template(smollm2_tokenizer, transformers_gguf_tokenizer):
  messages = [{'role': 'user', 'content': 'What is 2+2?'}]
  ids = smollm2_tokenizer.apply_chat_template(messages)

  text = smollm2_tokenizer.decode(ids)
  assert text.startswith('<|im_start|>system\n')
  assert text.endswith('<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n')
  expected = transformers_gguf_tokenizer.apply_chat_template(
      messages, add_generation_prompt=True, tokenize=False)
  assert ids == transformers_gguf_tokenizer.encode(expected, add_special_tokens=False)


def test_from_gguf_file(tiny_hf_checkpoint, tmp_path):
  """Tokenizer.from_gguf reads a file's tokenizer metadata (here a GGUF of the tiny vocab)."""
  tokens = transformers.PreTrainedTokenizerFast.from_pretrained(
      tiny_hf_checkpoint).convert_ids_to_tokens(list(range(256)))
  path = str(tmp_path / 'tokenizer_only.gguf')
  writer = gguf.GGUFWriter(path, 'llama')
  writer.add_tokenizer_model('gpt2')
  writer.add_token_list(tokens)
  writer.add_token_types([3] * 3 + [1] * 253)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_add_bos_token(True)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.close()

  tokenizer = gguf_weights.load_tokenizer(path)

  assert tokenizer.encode('héllo') == Tokenizer.from_hf(tiny_hf_checkpoint).encode('héllo')
  assert tokenizer.decode(tokenizer.encode('héllo'), skip_special_tokens=True) == 'héllo'
  assert (tokenizer.bos_token_id, tokenizer.eos_token_ids) == (1, (2,))


def test_hf_tokenizer(tiny_hf_checkpoint):
  tokenizer = Tokenizer.from_hf(tiny_hf_checkpoint)
  ids = tokenizer.encode('héllo')

  assert ids[0] == tokenizer.bos_token_id == 1  # this tokenizer prepends <s>, like LLaMA's
  assert tokenizer.decode(ids[1:]) == 'héllo'
  assert tokenizer.eos_token_ids == (2,)
  assert tokenizer.vocab_size == 256


def test_no_chat_template(tiny_hf_checkpoint):
  with pytest.raises(ValueError, match='no chat template'):
    Tokenizer.from_hf(tiny_hf_checkpoint).apply_chat_template([{'role': 'user', 'content': 'x'}])


def test_unsupported_gguf_tokenizer_model():
  with pytest.raises(ValueError, match="tokenizer model 'llama' is not supported"):
    Tokenizer.from_gguf_metadata({'tokenizer.ggml.model': 'llama',
                                  'tokenizer.ggml.tokens': ['<unk>']})


def test_saved_tokenizer_reads_back_alike(smollm2_tokenizer, tmp_path):
  """`save` writes what `from_folder` reads (the model cache's copy), and what transformers
  reads too."""
  smollm2_tokenizer.save(str(tmp_path))
  again = Tokenizer.from_folder(str(tmp_path), smollm2_tokenizer.bos_token_id,
                                smollm2_tokenizer.eos_token_ids)
  messages = [{'role': 'user', 'content': 'What is 2+2?'}]
  assert again.apply_chat_template(messages) == smollm2_tokenizer.apply_chat_template(messages)
  assert [again.encode(t) for t in TEXTS] == [smollm2_tokenizer.encode(t) for t in TEXTS]
  hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
  assert hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
      smollm2_tokenizer.decode(smollm2_tokenizer.apply_chat_template(messages))


def test_tokenizing_a_chat_imports_neither_torch_nor_transformers(smollm2_path):
  """transformers' tokenizer classes import torch where it is installed (5.17 does, through
  their GGUF reader), and its package start alone costs seconds: a run imports neither."""
  code = ('import sys, clasp_jax.cli.generate\n'
          'from clasp_jax.weights import gguf\n'
          f'tokenizer = gguf.load_tokenizer({smollm2_path!r})\n'
          "ids = tokenizer.apply_chat_template([{'role': 'user', 'content': 'Hi'}])\n"
          'tokenizer.decode(ids, skip_special_tokens=True)\n'
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n")
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True)
  assert result.stdout.strip() == '[]'


@pytest.mark.parametrize('layout', ['named_templates', 'jinja_file'])
def test_folder_chat_templates_and_token_objects(tiny_hf_checkpoint, tmp_path, layout):
  """tokenizer_config.json may hold special tokens as serialised AddedTokens and the chat
  template as a list of named ones; transformers 5 writes the template to chat_template.jinja."""
  template = '{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}'
  settings = dict(bos_token=dict(content='<s>', lstrip=False), eos_token='</s>')
  if layout == 'named_templates':
    settings['chat_template'] = [dict(name='tool_use', template='unused'),
                                 dict(name='default', template=template)]
  else:
    (tmp_path / 'chat_template.jinja').write_text(template, encoding='utf-8')
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(settings), encoding='utf-8')
  (tmp_path / 'tokenizer.json').write_bytes(
      (pathlib.Path(tiny_hf_checkpoint) / 'tokenizer.json').read_bytes())

  tokenizer = Tokenizer.from_hf(str(tmp_path))

  ids = tokenizer.apply_chat_template([{'role': 'user', 'content': 'hi'}])
  assert tokenizer.decode(ids) == '<s>[user] hi\n'
  assert ids[0] == tokenizer.bos_token_id == 1 and tokenizer.eos_token_ids == (2,)
