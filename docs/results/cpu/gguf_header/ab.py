"""Loading the embedded SmolLM2 GGUF: the header through `gguf.GGUFReader` (as up to the commit
before this change) against `clasp_jax.weights.gguf.read_gguf`, in turns in one process.

    python docs/results/cpu/gguf_header/ab.py

Prints the median seconds of the header alone (metadata and tensor table) and of the whole
`load_gguf` (header, dequantisation, conversion; float32), each way, and checks that both ways
give the same metadata and the same params.
"""

import statistics
import time

import gguf
import numpy as np

from clasp_jax import weights
from clasp_jax.weights import gguf as gguf_weights

REPS = 5


def library_header(path):
  """The header as the commit before this change read it: `gguf.GGUFReader`."""
  reader = gguf.GGUFReader(path)
  metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith('GGUF.')}
  tensors = {t.name: gguf_weights.GGUFTensor(t.name, t.tensor_type, t.data)
             for t in reader.tensors}
  return metadata, tensors


def main():
  path = weights.embedded_model_path()
  ours = gguf_weights.read_gguf
  ways = {'gguf.GGUFReader': library_header, 'read_gguf': ours}
  header = {name: [] for name in ways}
  load = {name: [] for name in ways}
  results = {}
  for rep in range(REPS):
    for name, read in (ways.items() if rep % 2 == 0 else reversed(ways.items())):
      start = time.perf_counter()
      read(path)
      header[name].append(time.perf_counter() - start)
      gguf_weights.read_gguf = read  # what load_gguf calls
      start = time.perf_counter()
      results[name] = gguf_weights.load_gguf(path, np.float32)
      load[name].append(time.perf_counter() - start)
      gguf_weights.read_gguf = ours
  (m_lib, _), (m_ours, _) = (library_header(path), ours(path))
  (c_lib, p_lib, _), (c_ours, p_ours, _) = results['gguf.GGUFReader'], results['read_gguf']
  same = (m_lib == m_ours and c_lib == c_ours and all(
      np.array_equal(a, b) for a, b in zip(_leaves(p_lib), _leaves(p_ours))))
  for name in ways:
    print(f'{name:16s} header {statistics.median(header[name]):6.3f} s   '
          f'load_gguf {statistics.median(load[name]):6.3f} s   (median of {REPS})')
  print('same metadata, config and params:', same)


def _leaves(params):
  layers = params['layers']
  return [params[k] for k in sorted(params) if k != 'layers'] + [layers[k] for k in sorted(layers)]


if __name__ == '__main__':
  main()
