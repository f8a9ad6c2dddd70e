"""Chat templates rendered as transformers renders them, with jinja2 alone.

A model's chat template is Jinja code that comes with its checkpoint. transformers renders it
in jinja2's immutable sandbox with a few settings and helpers of its own
(`transformers.utils.chat_template_utils`); `render` builds the same environment, so that a
chat's text is the one transformers gives (tests/test_chat_template.py compares them), without
importing transformers: its package start cost a CLI 0.7 s on a 2-core CPU and about 1.5 s on
an H200 machine (docs/results/h200/cold_start_24ecb83), most of what a chat added to a start.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import datetime
import functools
import json
from typing import Any

import jinja2
from jinja2 import ext
from jinja2 import nodes
from jinja2 import sandbox

# Where messages may carry a turn's reasoning; transformers hands a template the first one
# found under the first two names.
_REASONING_FIELDS = ('reasoning_content', 'thinking', 'reasoning')


class _GenerationBlocks(ext.Extension):
  """`{% generation %} ... {% endgeneration %}` renders its body: transformers marks the
  assistant's text with it when it trains, and a template written for that may carry it."""

  tags = {'generation'}

  def parse(self, parser: jinja2.parser.Parser) -> nodes.CallBlock:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
    return nodes.CallBlock(self.call_method('_body'), [], [], body).set_lineno(lineno)

  def _body(self, caller: jinja2.runtime.Macro) -> str:
    return caller()


class _Dict:
  """What a template may call as `dict`: building a dict, not the type itself."""

  def __call__(self, *args, **kwargs) -> dict[Any, Any]:
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs) -> dict[Any, Any]:
    return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
  """jinja2's `namespace`, refusing attribute names that start with an underscore (a way to
  Python's internals)."""

  def __init__(*args, **kwargs):  # pylint: disable=no-method-argument (jinja2's own signature)
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name: str, value: Any) -> None:
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name: Any) -> None:
    if isinstance(name, str) and name.startswith('_'):
      raise jinja2.exceptions.SecurityError(
          f'chat templates cannot store underscore-prefixed attributes, got {name!r}')


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
  """JSON as `json.dumps` writes it (jinja2's own filter escapes HTML characters)."""
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(format_: str) -> str:
  return datetime.datetime.now().strftime(format_)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
  """`template` compiled in transformers' environment (kept: a chat renders one template
  many times)."""
  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlocks, ext.loopcontrols])
  env.filters['tojson'] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                     dict=_Dict(), namespace=_Namespace)
  return env.from_string(template)


def _plain_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """The messages as plain JSON data (what a sandboxed template may be shown), each turn's
  reasoning under the names templates read."""
  try:
    plain = json.loads(json.dumps(list(messages)))
  except (TypeError, ValueError) as e:
    raise ValueError(f'chat messages must hold only JSON data (strings, numbers, lists, dicts): '
                     f'{e}') from None
  if not all(isinstance(m, dict) for m in plain):
    raise ValueError('each chat message must be a dict, such as {"role": "user", "content": ...}')
  aliased = []
  for message in plain:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
      message = {'thinking': reasoning, **message, 'reasoning_content': reasoning}
    aliased.append(message)
  return aliased


def render(template: str, messages: Sequence[Mapping[str, Any]], *,
           add_generation_prompt: bool = True, **variables: Any) -> str:
  """A chat's text as the model's template writes it.

  Args:
    template: the model's Jinja chat template.
    messages: `[{'role': 'user', 'content': '...'}, ...]`, JSON data only.
    add_generation_prompt: end with what opens the assistant's turn.
    **variables: what else the template may read, such as `bos_token` and `eos_token`.

  Raises:
    ValueError: for messages that are not JSON data.
    jinja2.TemplateError: from the template (a syntax error, or its own `raise_exception`).
  """
  return _compile(template).render(messages=_plain_messages(messages), tools=None,
                                   documents=None, add_generation_prompt=add_generation_prompt,
                                   **variables)
