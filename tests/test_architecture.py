"""The architecture, checked: import-linter contracts and the lint rule set.

pyproject.toml holds the contracts (commands on top, the library in rooms,
no room importing one above it, only core.tfhost importing TensorFlow) and
ruff's small rule set. A failure names the import or line that broke them.
"""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name: str) -> str:
  path = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
  if not os.path.exists(path):
    pytest.fail(f'{name} is not installed: pip install -e ".[test]"')
  return path


def test_import_contracts_are_kept():
  proc = subprocess.run([_tool('lint-imports'), '--no-cache'], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert 'broken' not in proc.stdout.split('Contracts:')[-1].split(',')[0]


def test_ruff_is_clean():
  proc = subprocess.run([_tool('ruff'), 'check', 'llm_jax', 'tests', 'configs',
                         'benchmarks'], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout[-4000:]


def test_files_directly_in_the_package_are_commands():
  """Each is ``python -m llm_jax.X``: flags, one library call, printing (cli.py is their path)."""
  package = os.path.join(ROOT, 'llm_jax')
  for name in sorted(os.listdir(package)):
    if not name.endswith('.py') or name in ('__init__.py', 'cli.py'):
      continue
    with open(os.path.join(package, name), encoding='utf-8') as f:
      text = f.read()
    assert "if __name__ == '__main__':" in text and 'cli.run(' in text, (
        f'llm_jax/{name} is not a command; library code belongs in a room '
        '(llm_jax/<room>/).')
    assert len(text.splitlines()) < 200, f'llm_jax/{name} is not thin'
