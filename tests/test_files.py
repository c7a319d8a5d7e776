"""Whole-or-nothing writes that never replace what is not ours, and file locks."""

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from llm_jax.core import files
from llm_jax.core.errors import UserError

MARKER = os.path.join('assets.extra', 'llm_jax_export.json')


def make_run(root) -> str:
  """A run directory with the files a user would lose."""
  run = root / 'run'
  (run / 'checkpoints' / '20').mkdir(parents=True)
  (run / 'checkpoints' / '20' / 'commit_success.txt').write_text('ok')
  (run / 'config.json').write_text('{}')
  return str(run)


def snapshot(path) -> dict:
  return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), 'rb').read()
          for d, _, names in os.walk(path) for f in names}


def export_guard(run: str) -> dict:
  """What ``deploy.saved_model.export`` passes: the run, and its own export/."""
  return dict(marker=MARKER, protect=(run,), allow_inside=(os.path.join(run, 'export'),),
              what='export')


@pytest.mark.parametrize('out, message', [
    ('.', 'is or holds'),  # --out=RUN --overwrite: the run itself.
    ('..', 'is or holds'),  # A directory that holds the run.
    ('checkpoints', 'lies inside'),  # Inside the run, outside RUN/export.
    ('exports/1', 'lies inside'),  # A near miss of RUN/export.
])
def test_export_may_not_replace_or_enter_the_run(tmp_path, out, message):
  run = make_run(tmp_path)
  before = snapshot(tmp_path)
  target = os.path.normpath(os.path.join(run, out))
  with pytest.raises(UserError, match=message):
    files.check_replaceable(target, **export_guard(run))
  with pytest.raises(UserError, match=message):
    with files.atomic_dir(target, overwrite=True, **export_guard(run)) as tmp:
      open(os.path.join(tmp, 'x'), 'w').close()
  assert snapshot(tmp_path) == before, 'the run changed'


def test_export_inside_run_export_is_fine(tmp_path):
  run = make_run(tmp_path)
  out = os.path.join(run, 'export', '1')
  files.check_replaceable(out, **export_guard(run))
  with files.atomic_dir(out, **export_guard(run)) as tmp:
    os.makedirs(os.path.join(tmp, 'assets.extra'))
    open(os.path.join(tmp, MARKER), 'w').close()
  assert os.path.exists(os.path.join(out, MARKER))
  # An earlier export of ours may be replaced, whole.
  with files.atomic_dir(out, overwrite=True, **export_guard(run)) as tmp:
    os.makedirs(os.path.join(tmp, 'assets.extra'))
    with open(os.path.join(tmp, MARKER), 'w') as f:
      f.write('2')
  assert open(os.path.join(out, MARKER)).read() == '2'
  assert os.listdir(os.path.join(run, 'export')) == ['1'], 'a temporary was left'


def test_overwrite_of_a_directory_that_is_not_an_export_is_refused(tmp_path):
  other = tmp_path / 'photos'
  other.mkdir()
  (other / 'a.jpg').write_bytes(b'jpeg')
  with pytest.raises(UserError, match='not an earlier export of llm_jax'):
    with files.atomic_dir(str(other), overwrite=True, marker=MARKER, what='export'):
      pass
  with pytest.raises(UserError, match='exists and is not empty'):
    with files.atomic_dir(str(other), overwrite=False, marker=MARKER):
      pass
  assert snapshot(other) == {'a.jpg': b'jpeg'}
  assert sorted(os.listdir(tmp_path)) == ['photos'], 'a temporary was left'


def test_created_directory_is_readable_by_others(tmp_path):
  """mkdtemp makes 0700 directories; a SavedModel a server user reads must not be."""
  old = os.umask(0o022)
  try:
    with files.atomic_dir(str(tmp_path / 'out')) as tmp:
      open(os.path.join(tmp, 'f'), 'w').close()
  finally:
    os.umask(old)
  mode = stat.S_IMODE(os.stat(tmp_path / 'out').st_mode)
  assert mode == 0o755, oct(mode)


def test_a_failed_block_leaves_nothing(tmp_path):
  with pytest.raises(RuntimeError):
    with files.atomic_dir(str(tmp_path / 'out')) as tmp:
      open(os.path.join(tmp, 'half'), 'w').close()
      raise RuntimeError('disk full')
  assert os.listdir(tmp_path) == []


HOLD = textwrap.dedent('''
    import sys, time
    from llm_jax.core import files
    lock = files.FileLock(sys.argv[1])
    assert lock.acquire(wait=False, note='held by the child')
    print('locked', flush=True)
    time.sleep(600)
''')


def test_lock_is_exclusive_and_freed_when_its_holder_is_killed(tmp_path):
  path = str(tmp_path / 'run.lock')
  env = {**os.environ, 'PYTHONPATH': os.path.dirname(os.path.dirname(__file__))}
  child = subprocess.Popen([sys.executable, '-c', HOLD, path], stdout=subprocess.PIPE,
                           text=True, env=env)
  try:
    assert child.stdout.readline().strip() == 'locked'
    lock = files.FileLock(path)
    assert not lock.acquire(wait=False, note='second')
    assert lock.holder() == 'held by the child'
  finally:
    child.kill()  # kill -9: no chance to release anything.
    child.wait(timeout=30)
  assert lock.acquire(wait=False, note='mine'), 'a dead process still holds the lock'
  assert lock.holder() == 'mine'
  lock.release()
