"""clasp-generate: continue a prompt with one decoding method and print the text and its stats.

  clasp-generate --prompt="Why is the sky blue?" --chat --method=clasp
  clasp-generate --prompt_file=question.txt --chat      (--prompt_file=- reads standard input)

Prints the text as it is generated, then one line: prompt tokens, new tokens, the time to the
first token, the time spent decoding and its tokens/s (also after the first token), the time
spent compiling (apart: the first run compiles before its first token; later runs load the
compiled programs from --cache_dir) and, for speculative
methods, tau (mean tokens per round) and the number of rounds. clasp-bench measures
steady-state speed. Progress messages (loading, converting, compiling) go to stderr unless
--quiet is given.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import re
import sys

from absl import flags

from clasp_jax import strategies
from clasp_jax.cli import flags as flags_lib
from clasp_jax.engine import Generation
from clasp_jax.generation import encode_prompt, make_decoder

STDIN = '-'

flags.DEFINE_string('prompt', None, 'The text to continue (or give --prompt_file).')
flags.DEFINE_string('prompt_file', None, 'A UTF-8 file holding the text to continue, for long '
                    f'prompts; {STDIN}: standard input. Trailing newlines are dropped.')
flags.DEFINE_bool('chat', False, 'Wrap the prompt in the model chat template.')
flags.DEFINE_enum('method', 'clasp', strategies.METHODS, 'The decoding method.')
flags.register_multi_flags_validator(
    ['prompt', 'prompt_file'], lambda f: (f['prompt'] is None) != (f['prompt_file'] is None),
    message='give exactly one of --prompt and --prompt_file')
flags.register_validator('prompt', lambda prompt: prompt is None or bool(prompt.strip()),
                         message='the prompt is empty')
flags.adopt_module_key_flags(flags_lib)

FLAGS = flags.FLAGS


def read_prompt() -> str:
  """The prompt: --prompt, or the text of --prompt_file (standard input for `-`).

  Raises:
    ValueError: when the file cannot be read as UTF-8 text, or holds only white space.
  """
  if FLAGS.prompt is not None:
    return FLAGS.prompt
  path = FLAGS.prompt_file
  try:
    if path == STDIN:
      text = sys.stdin.buffer.read().decode('utf-8')
    else:
      with open(path, encoding='utf-8') as f:
        text = f.read()
  except OSError as e:
    raise ValueError(f'--prompt_file={path}: {e.strerror}') from None
  except UnicodeDecodeError:
    raise ValueError(f'--prompt_file={path}: not UTF-8 text') from None
  if not text.strip():
    raise ValueError(f'the prompt is empty (--prompt_file={path})')
  return text.rstrip('\n')


# Trailing whitespace and U+FFFD: text a later token may still change.
_UNSETTLED_END = re.compile(r'[\s\ufffd]+$')


class TextStream:
  """Prints a generation's text while its tokens arrive (`Decoder.generate`'s `on_tokens`).

  Only settled text is printed: a token may end inside a UTF-8 character (decoded as U+FFFD
  until the rest arrives), and a tokenizer may tidy the spaces before what comes next, so text
  ending in either waits for more tokens. Should a longer decode still not extend what was
  printed, streaming stops and `finish` prints the whole text on a line of its own.
  """

  def __init__(self, tokenizer, out=sys.stdout):
    self.tokenizer, self.out = tokenizer, out
    self.token_ids: list[int] = []
    self.printed = ''
    self.broken = False

  def __call__(self, token_ids: list[int]) -> None:
    self.token_ids += token_ids
    text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
    settled = _UNSETTLED_END.sub('', text)
    if self.broken or not settled.startswith(self.printed):
      self.broken = True
      return
    self.out.write(settled[len(self.printed):])
    self.out.flush()
    self.printed = settled

  def finish(self, text: str) -> None:
    """Prints the rest of the generation's `text` and ends the line."""
    if self.broken:
      self.out.write('\n' if self.printed else '')
      self.printed = ''
    self.out.write(text[len(self.printed):] + '\n')
    self.out.flush()


def generate_from_flags() -> Generation:
  """Loads the model and generates as the flags say, printing the text as it comes; every
  check runs before compiling.

  Raises:
    ValueError: for settings or a request the model cannot serve.
  """
  prompt = read_prompt()
  sampling = flags_lib.sampling_config()
  strategy_kwargs = flags_lib.strategy_kwargs()
  model = flags_lib.load_model()
  decoder = make_decoder(model, FLAGS.method, **dataclasses.asdict(sampling),
                         **flags_lib.decoder_kwargs(), **strategy_kwargs)
  prompt_ids = encode_prompt(model, prompt, chat=FLAGS.chat)
  flags_lib.progress('compiling, then generating (the first run compiles; later ones load the '
                     'compiled programs from --cache_dir) ...')
  stream = TextStream(model.tokenizer)
  generation = decoder.generate(prompt_ids, FLAGS.max_new_tokens, seed=FLAGS.seed,
                                on_tokens=stream)
  stream.finish(generation.text)
  return generation


def stats_line(generation: Generation, speculative: bool) -> str:
  """One line of statistics; tau and rounds only for speculative methods.

  The decoding speed leaves compilation out: a one-off run spends much of its time compiling,
  which a reused decoder does not, so a speed over the whole time would understate the
  method's. The compile time is shown on its own instead, and so is the time the method spent
  timing the device where it did (the default method's first run, `--cache_dir` unset or new).
  The time to the first token is shown too, and the speed after it: in a short generation the
  prefill, and in a new process each program's first run (on a GPU about 0.1 s for a small
  model's prefill, `docs/results/h100/first_generation/`), weigh on the speed over all tokens.

  Args:
    generation: the generation to describe.
    speculative: whether the method drafts (then tau and the rounds are shown).
  """
  parts = [f'prompt tokens {generation.prompt_tokens}', f'new tokens {generation.new_tokens}']
  if generation.first_token_seconds is not None:
    parts.append(f'first token {generation.first_token_seconds:.2f} s')
  decoding = (f'decoding {generation.decode_seconds:.1f} s, '
              f'{generation.tokens_per_second:.1f} tokens/s')
  if generation.tokens_per_second_after_first is not None:
    decoding += f' ({generation.tokens_per_second_after_first:.1f} after the first)'
  parts += [decoding, f'compiling {generation.compile_seconds:.1f} s']
  if generation.calibration_seconds >= 0.05:  # a measurement, not a read of remembered costs
    parts.append(f'timing the device {generation.calibration_seconds:.1f} s')
  if speculative:
    parts += [f'tau {generation.mean_accepted:.2f}',
              f'rounds {len(generation.accept_lengths)}']
  return ' | '.join(parts)


def main(argv: Sequence[str]) -> None:
  with flags_lib.usage_errors(argv):
    generation = generate_from_flags()
  print(stats_line(generation, speculative=FLAGS.method != 'vanilla'))


def run() -> None:
  """The `clasp-generate` console script."""
  flags_lib.run(main, __name__)


if __name__ == '__main__':
  run()
