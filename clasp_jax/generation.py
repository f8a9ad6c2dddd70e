"""Text in, text out: the convenience layer the CLI and notebooks share."""

from __future__ import annotations

from clasp_jax import strategies
from clasp_jax.engine import Decoder, Generation
from clasp_jax.sampling import SamplingConfig
from clasp_jax.weights import LoadedModel


def encode_prompt(model: LoadedModel, prompt: str, *, chat: bool = False,
                  history: list[dict] | None = None) -> list[int]:
  """Token ids of a prompt, wrapped in the model's chat template when `chat` is set.

  Args:
    model: the loaded model.
    prompt: the user's text.
    chat: apply the chat template (with the assistant turn opened).
    history: earlier chat messages ({'role', 'content'}) before this prompt.

  Raises:
    ValueError: for an empty prompt.
  """
  if not prompt or not prompt.strip():
    raise ValueError('the prompt is empty')
  if chat:
    messages = list(history or []) + [{'role': 'user', 'content': prompt}]
    return model.tokenizer.apply_chat_template(messages)
  return model.tokenizer.encode(prompt)


def make_decoder(model: LoadedModel, method: str = 'clasp', *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, pass_width: int | None = None,
                 attention: str = 'auto', cpu_kernel: bool | None = None,
                 rows_apart: bool | None = None, **strategy_settings) -> Decoder:
  """A `Decoder` for `method` (see `strategies.build` for the settings), on the mesh the model
  was loaded onto (`load(mesh=...)`), its passes `pass_width` rows wide (None: the platform's),
  K unset what one such pass verifies; `attention`, `cpu_kernel` and `rows_apart` as
  `Decoder` takes them. Keep it to reuse its compiled functions across generations."""
  sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
  strategy = strategies.build(method, model.config, pass_width=pass_width, **strategy_settings)
  return Decoder(model.params, model.config, strategy, sampling, tokenizer=model.tokenizer,
                 mesh=model.mesh, pass_width=pass_width, attention=attention,
                 cpu_kernel=cpu_kernel, rows_apart=rows_apart)


def generate(model: LoadedModel, prompt: str, *, method: str = 'clasp', chat: bool = False,
             max_new_tokens: int = 256, seed: int = 0, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, **strategy_settings) -> Generation:
  """Generates a continuation of `prompt` (one-off; build a `Decoder` to generate many)."""
  prompt_ids = encode_prompt(model, prompt, chat=chat)
  decoder = make_decoder(model, method, temperature=temperature, top_k=top_k, top_p=top_p,
                         **strategy_settings)
  return decoder.generate(prompt_ids, max_new_tokens, seed=seed)
