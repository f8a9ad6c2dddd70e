"""Re-executes the demo notebook in place, so that its committed outputs come from a real run.

  python scripts/run_notebook.py                       (notebooks/clasp_demo.ipynb)
  python scripts/run_notebook.py path/to/other.ipynb

Runs every cell in a fresh kernel, from the notebook's folder and with its own parameters, and
writes the notebook back with the new outputs (figures included). Needs the test extra
(nbclient, nbformat, ipykernel). On a CPU, set JAX_PLATFORMS=cpu first where an accelerator is
present but should not be used.
"""

from pathlib import Path
import sys
import time

import nbclient
import nbformat

DEFAULT = Path(__file__).resolve().parents[1] / 'notebooks' / 'clasp_demo.ipynb'
CELL_TIMEOUT_S = 900


def run_in_place(path: Path) -> None:
  """Executes `path` top to bottom and saves it with the outputs, or leaves it untouched when a
  cell fails (the error propagates)."""
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                                   record_timing=False,  # No timestamps to churn the diff.
                                   resources={'metadata': {'path': str(path.parent)}})
  start = time.perf_counter()
  client.execute()
  nbformat.write(notebook, path)
  print(f'{path}: executed in {time.perf_counter() - start:.0f} s and saved')


def main(argv: list[str]) -> None:
  if len(argv) > 2:
    sys.exit(f'usage: {argv[0]} [notebook.ipynb]')
  run_in_place(Path(argv[1]) if len(argv) == 2 else DEFAULT)


if __name__ == '__main__':
  main(sys.argv)
