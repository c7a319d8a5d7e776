"""Every preset loads, declares nothing base.py lacks, and documents its command."""

import pathlib

import pytest

from llm_jax.core import configuration
from llm_jax.core.errors import UserError

PRESETS = sorted(pathlib.Path(configuration.CONFIGS_DIR).glob('*.py'))


@pytest.mark.parametrize('path', PRESETS, ids=lambda p: p.stem)
def test_preset_loads_and_overrides_only_declared_keys(path):
  config = configuration.load_preset(path)
  configuration.check_keys(config)  # Raises on a key base.py lacks.
  assert config.name == path.stem, 'config.name should match the file name'
  doc = path.read_text().split('"""')[1]
  assert f'--config=configs/{path.name}' in doc, 'docstring must give the run command'


def test_base_declares_every_key_with_a_comment():
  lines = (configuration.CONFIGS_DIR / 'base.py').read_text().splitlines()
  assignments = [(i, l) for i, l in enumerate(lines)
                 if l.strip().startswith('c.') and ' = ' in l and 'ConfigDict()' not in l]
  # A comment on the line itself or directly above it.
  undocumented = [l for i, l in assignments
                  if '#' not in l and not lines[i - 1].strip().startswith('#')]
  assert len(assignments) > 40
  assert not undocumented, f'keys without a comment: {undocumented}'


def test_unknown_key_is_refused_with_its_name():
  config = configuration.base_config()
  config.train.stepz = 3
  with pytest.raises(UserError, match="'train.stepz'"):
    configuration.check_keys(config)


def test_missing_preset_file():
  with pytest.raises(UserError, match='No config file at'):
    configuration.load_preset('configs/does_not_exist.py')
