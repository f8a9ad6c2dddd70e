"""Where a CPU plain-decoding step spends its time: XLA's CPU ops of a traced generation,
summed per kind of op (the HLO name less its numeric suffix), per token.

  python docs/results/cpu/step_profile/profile.py          # from the repository root
  FAST_PATH=1 python docs/results/cpu/step_profile/profile.py

The embedded SmolLM2-135M-Instruct, plain decoding after the shortest and the longest prompt
of one Spec-Bench question per group: a traced generation of 33 tokens less one of 1 (the
prefill and the first token), each after an untimed one of its length, per token of the 32;
the traces read with jaxlib's `ProfileData`. Each
event is an op as the thunk runtime ran it; a matrix product's event can end before its
threads do (Eigen works on in its pool), so products are undercounted and the sum of the
events is less than the wall time. FAST_PATH=1 gives the decoder the per-layer weight layout
(`Decoder(fast_path=True)`, the accelerators' default) instead of the CPU's stacked one.
"""
import collections
import glob
import os
import re
import tempfile

import jax
from jax._src.lib import _profile_data  # pylint: disable=g-direct-tensorflow-import

import clasp_jax
from clasp_jax import strategies
from clasp_jax.bench import specbench

NEW = 32
model = clasp_jax.load()
questions = specbench.load_questions('../shared/data/spec_bench/question.jsonl', 1)
prompts = sorted((clasp_jax.encode_prompt(model, q['turns'][0], chat=True) for q in questions),
                 key=len)
decoder = clasp_jax.Decoder(model.params, model.config, strategies.build('vanilla', model.config),
                            fast_path=bool(int(os.environ.get('FAST_PATH', '0'))))


def op_seconds(prompt, new_tokens):
  """Seconds per kind of op in a traced generation of `new_tokens` (after an untimed one)."""
  decoder.generate(prompt, new_tokens)
  folder = tempfile.mkdtemp()
  with jax.profiler.trace(folder):
    decoder.generate(prompt, new_tokens)
  trace = glob.glob(os.path.join(folder, '**', '*.xplane.pb'), recursive=True)[0]
  seconds, counts = collections.Counter(), collections.Counter()
  for plane in _profile_data.ProfileData.from_file(trace).planes:
    for line in plane.lines:
      if line.name.startswith('python'):
        continue
      for event in line.events:
        if (event.name.startswith(('end:', 'while', 'ThreadpoolListener'))
            or 'ThunkExecutor' in event.name):
          continue
        kind = re.sub(r'\.\d+$', '', event.name)
        seconds[kind] += event.duration_ns / 1e9
        counts[kind] += 1
  return seconds, counts


for prompt in (prompts[0], prompts[-1]):
  # The NEW tokens after the first: a generation of NEW + 1 less one of 1 (prefill, first token).
  (long_s, long_n), (short_s, short_n) = op_seconds(prompt, NEW + 1), op_seconds(prompt, 1)
  seconds, counts = long_s - short_s, long_n - short_n
  print(f'after a prompt of {len(prompt)} tokens: ops {sum(seconds.values()) / NEW * 1e3:.1f} '
        'ms a token')
  for kind, s in seconds.most_common(10):
    print(f'  {s / NEW * 1e3:7.2f} ms a token  {counts[kind] / NEW:5.0f} a token  {kind}')
