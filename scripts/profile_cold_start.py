"""What a user waits for: `clasp-generate` run as new processes, one after the other, sharing
one cache folder, each timed from its start to each thing it says.

  python scripts/profile_cold_start.py --processes=3 --max_new_tokens=64
  python scripts/profile_cold_start.py --cache_dir=~/.cache/clasp_jax -- --method=vanilla
  cd /tmp && PYTHONPATH=<older checkout> python <this checkout>/scripts/profile_cold_start.py \
      --command="python -m clasp_jax.cli.generate"

(`python -m` puts the current folder first on the module path: run it from the repository
root and it measures that checkout whatever PYTHONPATH says.)

The first process (with a new, empty folder) converts the model and compiles; the ones after
it load both from the folder. For each process the table gives the seconds from its start to
each progress message (stderr), to the first character of the answer (stdout: the answer is
streamed, so that is the prefill's token) and to its exit, and the statistics line it printed.
Arguments after `--` go to `clasp-generate` as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import shlex
import subprocess
import sys
import tempfile
import threading
import time

from absl import app
from absl import flags

_COMMAND = flags.DEFINE_string('command', 'clasp-generate', 'How to run clasp-generate (e.g. '
                               '"python -m clasp_jax.cli.generate" for a checkout on PYTHONPATH).')
_PROCESSES = flags.DEFINE_integer('processes', 3, 'clasp-generate processes, one after another.')
_CACHE_DIR = flags.DEFINE_string('cache_dir', None, 'The cache folder the processes share; '
                                 'default: a new, empty one.')
_PROMPT = flags.DEFINE_string('prompt', 'Why is the sky blue?', 'The prompt (with --chat).')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 64, 'New tokens per process.')
_OUT = flags.DEFINE_string('out', '', 'Write the timelines here as JSON.')


def timeline(command: Sequence[str]) -> dict:
  """Runs `command`; seconds from its start to each stderr line, to its first stdout
  character and to its exit, with what it printed."""
  start = time.perf_counter()
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
  events, first_char, out = [], [None], bytearray()

  def read_stdout():
    while chunk := proc.stdout.read(1):
      if first_char[0] is None:
        first_char[0] = time.perf_counter() - start
      out.extend(chunk)

  def read_stderr():
    for line in iter(proc.stderr.readline, b''):
      events.append((round(time.perf_counter() - start, 3), line.decode(errors='replace').strip()))

  readers = [threading.Thread(target=read_stdout), threading.Thread(target=read_stderr)]
  for reader in readers:
    reader.start()
  proc.wait()
  exit_seconds = time.perf_counter() - start
  for reader in readers:
    reader.join()
  lines = out.decode(errors='replace').strip().splitlines()
  return dict(returncode=proc.returncode, first_char_seconds=first_char[0],
              exit_seconds=exit_seconds, stderr=events, stats=lines[-1] if lines else '')


def main(argv: Sequence[str]) -> None:
  passthrough = list(argv[1:])
  cache_dir = _CACHE_DIR.value or tempfile.mkdtemp(prefix='clasp_cold_start_')
  executable = shlex.split(_COMMAND.value)
  command = [*executable, f'--prompt={_PROMPT.value}', '--chat',
             f'--max_new_tokens={_MAX_NEW_TOKENS.value}', f'--cache_dir={cache_dir}',
             *passthrough]
  print('$ ' + shlex.join(command))
  runs = []
  for i in range(_PROCESSES.value):
    run = timeline(command)
    runs.append(run)
    print(f'\nprocess {i + 1}: exit code {run["returncode"]}')
    for seconds, line in run['stderr']:
      print(f'  {seconds:7.2f} s  stderr: {line[:110]}')
    first = run['first_char_seconds']
    print(f'  {first:7.2f} s  first character of the answer' if first is not None
          else '          no answer printed')
    print(f'  {run["exit_seconds"]:7.2f} s  exit; {run["stats"]}')
  print('\n| process | first character s | exit s |\n|---|---|---|')
  for i, run in enumerate(runs):
    first = run['first_char_seconds']
    print(f'| {i + 1} | {"" if first is None else f"{first:.2f}"} | {run["exit_seconds"]:.2f} |')
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      shown = [a if not a.startswith('--cache_dir=') else '--cache_dir=<folder>' for a in command]
      json.dump(dict(command=shown, runs=runs), f, indent=1)
  sys.exit(max(run['returncode'] for run in runs) != 0)


if __name__ == '__main__':
  app.run(main)
