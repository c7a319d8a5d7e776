"""notebooks/quickstart.ipynb runs end to end (it trains, plots, samples, evaluates)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  # The kernel inherits this environment: its own run directory and data
  # cache, and the package from this checkout.
  monkeypatch.setenv('QUICKSTART_WORKDIR', str(tmp_path / 'run'))
  monkeypatch.setenv('LLM_JAX_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setenv('PYTHONPATH', ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  nb = nbformat.read(os.path.join(ROOT, 'notebooks', 'quickstart.ipynb'), as_version=4)
  # At most two minutes per cell; the whole notebook took 50 s on 2 CPU cores.
  NotebookClient(nb, timeout=120, kernel_name='python3',
                 resources={'metadata': {'path': os.path.join(ROOT, 'notebooks')}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  assert any('image/png' in o.get('data', {}) for o in outputs), 'no loss plot'
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'bits/byte' in text and '| perplexity |' in text
  assert os.path.isdir(tmp_path / 'run' / 'checkpoints' / '40')
