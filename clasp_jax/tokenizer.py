"""Text <-> token ids for a loaded model, built from a GGUF file or a Hugging Face folder.

`Tokenizer` runs on the Rust `tokenizers` library, which transformers' fast tokenizers wrap, and
renders chat templates in transformers' Jinja environment (`chat_template.render`), so ids and chat text
are the ones transformers gives. It imports nothing of transformers: its tokenizer classes import
torch where torch is installed (transformers 5.17 does, through its GGUF reader: 1.5-3.4 s of a
start on an H200 machine), this library must not need torch at run time, and transformers' own
package start costs seconds of a start too. A GGUF file carries no
`tokenizer.json`, only llama.cpp metadata (vocabulary, merges, token types, pre-tokenizer name,
chat template), so `Tokenizer.from_gguf_metadata` rebuilds the byte-level BPE tokenizer from those
fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import json
import os
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from clasp_jax.chat_template import render as render_chat

# Hugging Face's file names: the Rust tokenizer, and the settings transformers keeps beside it.
_TOKENIZER_FILE = 'tokenizer.json'
_CONFIG_FILE = 'tokenizer_config.json'
_TEMPLATE_FILE = 'chat_template.jinja'
# The special tokens a chat template may name, as transformers passes them to it.
_SPECIAL_TOKEN_NAMES = ('bos_token', 'eos_token', 'unk_token', 'pad_token')

# llama.cpp token types (`tokenizer.ggml.token_type`).
_CONTROL = 3
_USER_DEFINED = 4

# End-of-turn markers of common chat formats. When the chat template writes one and the vocabulary
# has it, generation must stop on it even if the checkpoint's eos id is a different token.
_END_OF_TURN_TOKENS = ('<|im_end|>', '<|eot_id|>', '<|eom_id|>', '<|end|>', '<end_of_turn>')

# The splitting regexes llama.cpp applies before byte-level BPE, keyed by `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_PRE = ('default', 'gpt2')
_DIGITS_THEN_GPT2_PRE = ('smollm', 'starcoder', 'refact')
_LLAMA3_PRE = ('llama-bpe', 'llama3', 'llama-v3', 'smaug-bpe')


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from each byte to a printable character (the byte-level alphabet)."""
  printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) +
               list(range(ord('®'), ord('ÿ') + 1)))
  extra = [b for b in range(256) if b not in printable]
  return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}


def _byte_level_spelling(token: str, alphabet: dict[int, str]) -> str:
  """The token as byte-level BPE spells it; llama.cpp stores a few tokens as raw text instead."""
  if set(token) <= set(alphabet.values()):
    return token
  return ''.join(alphabet[b] for b in token.encode('utf-8'))


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
  """The pre-tokenizer matching llama.cpp's `tokenizer.ggml.pre` name."""
  if pre in _GPT2_PRE:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _DIGITS_THEN_GPT2_PRE:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
  if pre in _LLAMA3_PRE:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_SPLIT), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
  supported = _GPT2_PRE + _DIGITS_THEN_GPT2_PRE + _LLAMA3_PRE
  raise ValueError(f'GGUF pre-tokenizer {pre!r} is not supported '
                   f'(supported: {", ".join(supported)})')


def _post_processor(bos: str | None, eos: str | None, vocab: Mapping[str, int]
                    ) -> processors.TemplateProcessing:
  """Adds BOS and/or EOS around every encoded text (either may be None: not added)."""
  specials = [t for t in (bos, eos) if t is not None]
  single = ' '.join(([f'{bos}:0'] if bos else []) + ['$A:0'] + ([f'{eos}:0'] if eos else []))
  return processors.TemplateProcessing(single=single,
                                       special_tokens=[(t, vocab[t]) for t in specials])


def _unique(ids: Iterable[int | None]) -> tuple[int, ...]:
  """The ids in first-seen order, without None and duplicates."""
  return tuple(dict.fromkeys(i for i in ids if i is not None))


def _end_of_turn_ids(chat_template: str | None, vocab: Mapping[str, int]) -> list[int]:
  """Ids of the known end-of-turn markers that the chat template writes."""
  if not chat_template:
    return []
  return [vocab[t] for t in _END_OF_TURN_TOKENS if t in chat_template and t in vocab]


def _as_list(value: int | Sequence[int] | None) -> list[int]:
  """A config's `eos_token_id` (an int, a list, or missing) as a list."""
  if value is None:
    return []
  return [value] if isinstance(value, int) else list(value)


def _token_text(value: str | Mapping[str, Any] | None) -> str | None:
  """A special token as tokenizer_config.json writes it (its text, or a serialised AddedToken)."""
  return value.get('content') if isinstance(value, Mapping) else value


def _chat_template(folder: str, settings: Mapping[str, Any]) -> str | None:
  """The folder's default chat template: chat_template.jinja, else tokenizer_config.json's
  (a string, or a list of named templates)."""
  path = os.path.join(folder, _TEMPLATE_FILE)
  if os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      return f.read()
  template = settings.get('chat_template')
  if isinstance(template, list):
    named = {t['name']: t['template'] for t in template}
    return named.get('default')
  return template


def _read_json(path: str) -> dict[str, Any]:
  """A JSON file's object, or {} when the file does not exist."""
  if not os.path.isfile(path):
    return {}
  with open(path, encoding='utf-8') as f:
    return json.load(f)


class Tokenizer:
  """Encodes text and chat messages to token ids and decodes ids back to text.

  Attributes:
    backend: the `tokenizers.Tokenizer` that encodes and decodes (adding BOS/EOS as its
      post-processor says).
    bos_token_id: the model's beginning-of-sequence id, or None.
    eos_token_ids: every id that ends a generation (eos and the chat end-of-turn token).
    chat_template: the model's Jinja chat template, or None.
    special_tokens: the special tokens by the names chat templates use (`bos_token`,
      `eos_token`, ...), as text.
  """

  def __init__(self, backend: tokenizers.Tokenizer, bos_token_id: int | None,
               eos_token_ids: Sequence[int], chat_template: str | None = None,
               special_tokens: Mapping[str, str] | None = None):
    self.backend = backend
    self.bos_token_id = bos_token_id
    self.eos_token_ids = tuple(eos_token_ids)
    self.chat_template = chat_template
    self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}

  @classmethod
  def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
    """Rebuilds the byte-level BPE tokenizer that llama.cpp metadata describes.

    Args:
      metadata: a GGUF file's key/value metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).

    Returns:
      The tokenizer; encoding adds BOS/EOS only when `tokenizer.ggml.add_bos_token` /
      `add_eos_token` say so, as llama.cpp does.

    Raises:
      ValueError: the metadata has no vocabulary, or describes a tokenizer other than byte-level
        BPE ('gpt2'), or a pre-tokenizer this module does not know.
    """
    model = metadata.get('tokenizer.ggml.model')
    if model != 'gpt2' or 'tokenizer.ggml.tokens' not in metadata:
      raise ValueError(f'GGUF tokenizer model {model!r} is not supported: only byte-level BPE '
                       "('gpt2', as in SmolLM2 and LLaMA 3) can be rebuilt from GGUF metadata")
    alphabet = _bytes_to_unicode()
    tokens = [_byte_level_spelling(t, alphabet) for t in metadata['tokenizer.ggml.tokens']]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(' ', 1)) for m in metadata.get('tokenizer.ggml.merges', [])]
    pre = metadata.get('tokenizer.ggml.pre', 'default')
    backend = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in _LLAMA3_PRE))
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    types = metadata.get('tokenizer.ggml.token_type', [])
    backend.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True)
                                for t, kind in zip(tokens, types) if kind == _CONTROL])
    backend.add_tokens([tokenizers.AddedToken(t, normalized=False, special=False)
                        for t, kind in zip(tokens, types) if kind == _USER_DEFINED])

    def token(key: str) -> str | None:
      index = metadata.get(f'tokenizer.ggml.{key}')
      return None if index is None else tokens[index]

    bos, eos = token('bos_token_id'), token('eos_token_id')
    backend.post_processor = _post_processor(
        bos if metadata.get('tokenizer.ggml.add_bos_token') else None,
        eos if metadata.get('tokenizer.ggml.add_eos_token') else None, vocab)
    chat_template = metadata.get('tokenizer.chat_template')
    eos_ids = _unique([metadata.get('tokenizer.ggml.eos_token_id'),
                       metadata.get('tokenizer.ggml.eot_token_id'),
                       metadata.get('tokenizer.ggml.eom_token_id'),
                       *_end_of_turn_ids(chat_template, vocab)])
    special = dict(bos_token=bos, eos_token=eos, unk_token=token('unknown_token_id'),
                   pad_token=token('padding_token_id'))
    return cls(backend, metadata.get('tokenizer.ggml.bos_token_id'), eos_ids, chat_template,
               special)

  @classmethod
  def from_folder(cls, folder: str, bos_token_id: int | None,
                  eos_token_ids: Sequence[int]) -> Tokenizer:
    """The tokenizer in a folder of Hugging Face's tokenizer files (what `save` writes), with
    the model's BOS and EOS ids given.

    Raises:
      ValueError: the folder has no tokenizer.json.
    """
    path = os.path.join(folder, _TOKENIZER_FILE)
    if not os.path.isfile(path):
      raise ValueError(f'cannot read the tokenizer: {folder} has no {_TOKENIZER_FILE}')
    settings = _read_json(os.path.join(folder, _CONFIG_FILE))
    special = {name: _token_text(settings.get(name)) for name in _SPECIAL_TOKEN_NAMES}
    return cls(tokenizers.Tokenizer.from_file(path), bos_token_id, eos_token_ids,
               _chat_template(folder, settings), special)

  @classmethod
  def from_hf(cls, folder: str) -> Tokenizer:
    """The tokenizer of a Hugging Face checkpoint folder (tokenizer.json and friends).

    Eos ids are the union of config.json's and generation_config.json's `eos_token_id` (LLaMA-3
    instruct lists `<|eot_id|>` only in the latter), the tokenizer's eos token, and the chat
    template's end-of-turn token.
    """
    tokenizer = cls.from_folder(folder, None, ())
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)

    def token_id(name: str) -> int | None:
      return vocab.get(tokenizer.special_tokens.get(name))

    config = _read_json(os.path.join(folder, 'config.json'))
    generation = _read_json(os.path.join(folder, 'generation_config.json'))
    tokenizer.eos_token_ids = _unique([*_as_list(config.get('eos_token_id')),
                                       *_as_list(generation.get('eos_token_id')),
                                       token_id('eos_token'),
                                       *_end_of_turn_ids(tokenizer.chat_template, vocab)])
    tokenizer.bos_token_id = config.get('bos_token_id', token_id('bos_token'))
    return tokenizer

  def save(self, folder: str) -> None:
    """Writes tokenizer.json and tokenizer_config.json (chat template, special tokens) into
    `folder`, as Hugging Face lays them out: `from_folder` and transformers both read them."""
    os.makedirs(folder, exist_ok=True)
    self.backend.save(os.path.join(folder, _TOKENIZER_FILE))
    settings = dict(self.special_tokens, chat_template=self.chat_template,
                    tokenizer_class='PreTrainedTokenizerFast')
    with open(os.path.join(folder, _CONFIG_FILE), 'w', encoding='utf-8') as f:
      json.dump({k: v for k, v in settings.items() if v is not None}, f, indent=2)

  @property
  def vocab_size(self) -> int:
    """Number of token ids, added special tokens included."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`; BOS/EOS as the model's tokenizer adds them by default, unless
    `add_special_tokens` is False."""
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """The text of `ids` (special tokens kept unless `skip_special_tokens`)."""
    return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat rendered by the model's template, ending with the assistant prompt.

    Args:
      messages: `[{'role': 'user', 'content': '...'}, ...]`.

    Raises:
      ValueError: the model has no chat template.
    """
    if not self.chat_template:
      raise ValueError('this model has no chat template; use encode() on plain text instead')
    text = render_chat(self.chat_template, messages, add_generation_prompt=True,
                       **self.special_tokens)
    # The template writes any BOS itself, so the tokenizer must not add another.
    return self.encode(text, add_special_tokens=False)
