"""clasp_jax.chat_template against transformers' renderer: the same text from the same template,
the same errors, the sandbox's refusals."""

import jinja2
import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from clasp_jax.chat_template import render

SPECIALS = dict(bos_token='<s>', eos_token='</s>')

# The LLaMA-3 instruct template's shape: a header per turn, trimmed contents, BOS once.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
          " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# What templates use beyond plain loops: whitespace control, namespace, loop controls, tojson,
# dict, a generation block, tools and documents unset, reasoning under both names.
FEATURES = """
{%- set ns = namespace(system=none, turns=0) -%}
{% for m in messages %}
  {% if m.role == 'system' %}{% set ns.system = m.content %}{% continue %}{% endif %}
  {% set ns.turns = ns.turns + 1 %}
  [{{ m.role }}] {{ m.content }}
  {% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}|{{ m.thinking }}</think>{% endif %}
  {% if m.role == 'assistant' %}{% generation %}{{ m.content | tojson }}{% endgeneration %}{% endif %}
  {% if ns.turns > 3 %}{% break %}{% endif %}
{% endfor %}
system={{ ns.system | tojson }} meta={{ dict(a=1, b=[1, 'é']) | tojson(indent=1) }}
tools={{ tools is none }} documents={{ documents is none }} keys={{ dict.fromkeys(['x']) | tojson }}
{% if add_generation_prompt %}<assistant>{% endif %}
"""

CHATS = [
    [{'role': 'user', 'content': 'What is 2+2?'}],
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': '  Hi\n'},
     {'role': 'assistant', 'content': 'Hello "there" <b>é</b>', 'reasoning': 'greet'},
     {'role': 'user', 'content': 'Bye'}],
    [{'role': 'user', 'content': str(i)} for i in range(6)],
]


def _transformers(template, messages, add_generation_prompt):
  (text,), _ = render_jinja_template(conversations=[messages], chat_template=template,
                                     add_generation_prompt=add_generation_prompt, **SPECIALS)
  return text


@pytest.fixture(scope='module')
def smollm2_template(smollm2):
  return smollm2.tokenizer.chat_template


@pytest.mark.parametrize('add_generation_prompt', [True, False])
@pytest.mark.parametrize('chat', CHATS)
@pytest.mark.parametrize('name', ['smollm2', 'llama3', 'features'])
def test_renders_what_transformers_renders(name, chat, add_generation_prompt, request):
  template = {'llama3': LLAMA3, 'features': FEATURES}.get(name) or request.getfixturevalue(
      'smollm2_template')
  text = render(template, chat, add_generation_prompt=add_generation_prompt, **SPECIALS)
  assert text == _transformers(template, chat, add_generation_prompt)
  assert chat[0]['content'] in text or chat[0]['role'] == 'system'


def test_a_template_raising_raises_the_same_error():
  template = "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}"
  chat = [{'role': 'assistant', 'content': 'x'}]
  with pytest.raises(jinja2.TemplateError, match='user first'):
    _transformers(template, chat, True)
  with pytest.raises(jinja2.TemplateError, match='user first'):
    render(template, chat)


@pytest.mark.parametrize('template', [
    "{{ messages.append('x') }}",                          # the data is immutable
    "{{ ''.__class__.__mro__ }}",                          # no dunder attributes
    "{% set ns = namespace() %}{% set ns._x = 1 %}",       # nor underscore names in a namespace
])
def test_the_sandbox_refuses_what_transformers_refuses(template):
  chat = [{'role': 'user', 'content': 'x'}]
  with pytest.raises(jinja2.exceptions.SecurityError):
    _transformers(template, chat, True)
  with pytest.raises(jinja2.exceptions.SecurityError):
    render(template, chat)


def test_messages_that_are_not_json_data_are_refused():
  with pytest.raises(ValueError, match='JSON data'):
    render(LLAMA3, [{'role': 'user', 'content': object()}], **SPECIALS)
  with pytest.raises(ValueError, match='must be a dict'):
    render(LLAMA3, ['hello'], **SPECIALS)
