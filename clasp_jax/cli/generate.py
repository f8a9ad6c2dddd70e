"""clasp-generate: continue a prompt with one decoding method and print the text and its stats.

  clasp-generate --prompt="Why is the sky blue?" --chat --method=clasp

Prints the text, then one line: prompt tokens, new tokens, tokens/s and, for speculative
methods, tau (mean tokens per round) and the number of rounds. A single generation's time
includes JIT compilation; clasp-bench measures steady-state speed.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

from absl import app
from absl import flags

from clasp_jax import strategies
from clasp_jax import weights
from clasp_jax.cli import flags as flags_lib
from clasp_jax.engine import Generation
from clasp_jax.generation import encode_prompt, make_decoder

flags.DEFINE_string('prompt', None, 'The text to continue.')
flags.DEFINE_bool('chat', False, 'Wrap the prompt in the model chat template.')
flags.DEFINE_enum('method', 'clasp', strategies.METHODS, 'The decoding method.')
flags.mark_flag_as_required('prompt')
flags.register_validator('prompt', lambda prompt: prompt is None or bool(prompt.strip()),
                         message='the prompt is empty')
flags.adopt_module_key_flags(flags_lib)

FLAGS = flags.FLAGS


def generate_from_flags() -> Generation:
  """Loads the model and generates as the flags say; every check runs before compiling.

  Raises:
    ValueError: for settings or a request the model cannot serve.
  """
  sampling = flags_lib.sampling_config()
  strategy_kwargs = flags_lib.strategy_kwargs()
  model = weights.load(**flags_lib.load_kwargs())
  decoder = make_decoder(model, FLAGS.method, **dataclasses.asdict(sampling), **strategy_kwargs)
  prompt_ids = encode_prompt(model, FLAGS.prompt, chat=FLAGS.chat)
  return decoder.generate(prompt_ids, FLAGS.max_new_tokens, seed=FLAGS.seed)


def stats_line(generation: Generation, speculative: bool) -> str:
  """One line of statistics; tau and rounds only for speculative methods."""
  parts = [f'prompt tokens {generation.prompt_tokens}', f'new tokens {generation.new_tokens}',
           f'{generation.tokens_per_second:.1f} tokens/s']
  if speculative:
    parts += [f'tau {generation.mean_accepted:.2f}',
              f'rounds {len(generation.accept_lengths)}']
  return ' | '.join(parts)


def main(argv: Sequence[str]) -> None:
  with flags_lib.usage_errors(argv):
    generation = generate_from_flags()
  print(generation.text)
  print(stats_line(generation, speculative=FLAGS.method != 'vanilla'))


def run() -> None:
  """The `clasp-generate` console script."""
  app.run(main, flags_parser=flags_lib.parse_flags)


if __name__ == '__main__':
  run()
