"""The demo notebook runs top to bottom in a fresh kernel, with small sizes, without an error or
third-party noise (transformers' PyTorch advice, tqdm's missing-widget warning)."""

from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / 'notebooks' / 'clasp_demo.ipynb'
# Replaces the values of the notebook's `parameters` cell, as papermill would, so that the run
# stays within a couple of minutes on 2 CPU cores.
PARAMETERS = '''
MAX_NEW_TOKENS = 8
SPEC_BENCH_PER_GROUP = 1
SPEC_BENCH_GROUPS = ['qa']
SPEC_BENCH_MAX_NEW_TOKENS = 8
'''
CELL_TIMEOUT_S = 300
NOISE = ('PyTorch was not found', 'TqdmWarning', 'IProgress not found', 'Traceback')


def _with_parameters(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
  """The notebook with PARAMETERS in a cell right after its `parameters` cell."""
  (index,) = [i for i, cell in enumerate(notebook.cells)
              if 'parameters' in cell.metadata.get('tags', [])]
  injected = nbformat.v4.new_code_cell(PARAMETERS.strip(),
                                       metadata={'tags': ['injected-parameters']})
  notebook.cells.insert(index + 1, injected)
  return notebook


@pytest.mark.slow
def test_notebook_runs_top_to_bottom():
  notebook = _with_parameters(nbformat.read(NOTEBOOK, as_version=4))
  client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                                   resources={'metadata': {'path': str(NOTEBOOK.parent)}})
  client.execute()  # Raises CellExecutionError at the first cell that fails.
  outputs = [output for cell in notebook.cells if cell.cell_type == 'code'
             for output in cell.outputs]
  stderr = ''.join(output.text for output in outputs if output.get('name') == 'stderr')
  assert not [noise for noise in NOISE if noise in stderr], stderr
  assert sum('image/png' in output.get('data', {}) for output in outputs) >= 4  # The figures.
  texts = ''.join(output.get('text', '') for output in outputs)
  assert 'clasp_jax is installed: nothing to do' in texts
  assert 'identical token ids: all 3 decoders' in texts
