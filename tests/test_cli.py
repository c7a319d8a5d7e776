"""Bad input on the command line: one clear line on stderr, exit status 2."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_cli(*args, cwd=ROOT):
  proc = subprocess.run([sys.executable, '-m', 'llm_jax.train', *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)
  return proc.returncode, proc.stderr.strip()


@pytest.mark.parametrize('args, message', [
    (['--config=configs/nope.py'],
     "Cannot load the config file 'configs/nope.py': [Errno 2] No such file"),
    (['--config=configs/base.py', '--config.train.stepz=3'],
     "Unknown config key in --config.train.stepz: the config has no key 'stepz' "
     "(did you mean 'steps'?)"),
    (['--config=configs/base.py', '--config.train.steps=abc'],
     "flag --config.train.steps=abc: invalid literal for int()"),
    ([], 'No config given. Pass --config=configs/base.py'),
])
def test_bad_flags_give_one_clear_line(args, message):
  code, err = train_cli(*args)
  assert code == 2
  assert err.startswith('error: ') and len(err.splitlines()) == 1, err
  assert message in err


def test_config_problems_give_one_line_before_anything_is_created(tmp_path):
  (tmp_path / 'broken.py').write_text('def get_config(:\n  return None\n')
  cases = [
      (['--config=configs/tiny.py', '--config.train.batch_size=0'],
       'train.batch_size=0 must be an integer of at least 1'),
      ([f'--config={tmp_path}/broken.py'],
       f"Cannot load the config file '{tmp_path}/broken.py': invalid syntax "
       f'({tmp_path}/broken.py, line 1)'),
      ([f'--config={tmp_path}/nope.py', '--config.train.steps=3'],
       f"Cannot load the config file '{tmp_path}/nope.py': [Errno 2] No such file"),
  ]
  for args, message in cases:
    code, err = train_cli(*args, f'--workdir={tmp_path}/run',
                          f'--config.data.cache_dir={tmp_path}/cache')
    assert code == 2, (args, err)
    assert err.startswith('error: ') and len(err.splitlines()) == 1, err
    assert message in err, err
  assert sorted(os.listdir(tmp_path)) == ['broken.py'], 'something was created'


def test_empty_glob_gives_one_clear_line(tmp_path):
  code, err = train_cli('--config=configs/tiny.py', '--config.data.source=text',
                        f'--config.data.paths={tmp_path}/none/*.txt',
                        f'--workdir={tmp_path}/run',
                        f'--config.data.cache_dir={tmp_path}/cache')
  assert code == 2, err
  last = err.splitlines()[-1]
  assert last.startswith('error: ') and 'none/*.txt' in last, err
  assert 'Traceback' not in err


def test_help_lists_flags():
  proc = subprocess.run([sys.executable, '-m', 'llm_jax.train', '--helpshort'],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0
  assert '--config' in proc.stdout and '--workdir' in proc.stdout
