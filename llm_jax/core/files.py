"""Whole-or-nothing writes: every file or directory a user may rely on goes through here.

``atomic_write`` writes a temporary sibling, flushes it to disk (fsync), renames
it over the target and syncs the parent directory, so a crash or a full disk
leaves either the old file or the new one, never a torn one. ``atomic_dir``
does the same for a directory (a SavedModel, a converted checkpoint, a token
cache): it is built under a temporary name and renamed into place only once
whole. Replacing an existing directory is refused unless it is recognisably
the same kind of output of ours (it holds the ``marker`` file) and it neither
is, holds nor lies inside a directory the caller protects (``protect``, e.g.
the run being exported), so a mistyped ``--out`` never deletes a user's data.

Paths with a scheme (``gs://...``) are written with ``etils.epath``: object
stores publish an object whole or not at all.

``FileLock`` is an exclusive ``flock`` on a file: two processes building the
same cache entry, or training into the same run directory, take turns or
refuse instead of interleaving their writes. The kernel releases it when its
process ends, however it ends (``kill -9`` too), so a stale lock never blocks.
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator

from etils import epath

from llm_jax.core.errors import UserError


def _fsync_dir(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return  # Not every filesystem lets a directory be opened; nothing to sync.
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def atomic_write(path: str, data: bytes | str) -> str:
  """Writes ``data`` to ``path`` whole or not at all; returns ``path``."""
  payload = data.encode('utf-8') if isinstance(data, str) else data
  path = os.fspath(path)
  if '://' in path:
    epath.Path(path).write_bytes(payload)
    return path
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp',
                             dir=directory)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  _fsync_dir(directory)
  return path


def atomic_write_json(path: str, obj, indent: int = 2) -> str:
  """``atomic_write`` of ``obj`` as JSON (a trailing newline, keys as given)."""
  return atomic_write(path, json.dumps(obj, indent=indent) + '\n')


def _fsync_tree(root: str) -> None:
  for directory, _, names in os.walk(root):
    for name in names:
      with contextlib.suppress(OSError):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
          os.fsync(fd)
        finally:
          os.close(fd)
    _fsync_dir(directory)


def _inside(a: str, b: str) -> bool:
  """Whether directory ``a`` is ``b`` or lies inside it (links resolved)."""
  a, b = os.path.realpath(a), os.path.realpath(b)
  return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def check_replaceable(final: str, *, marker: str | None, protect: tuple[str, ...] = (),
                      allow_inside: tuple[str, ...] = (), what: str = 'output') -> None:
  """Raises UserError unless ``final`` may be created or replaced by a new ``what``.

  ``final`` may be replaced only when it does not exist, is empty, or holds
  ``marker`` (our own earlier output of this kind). It must never be, or hold,
  a directory of ``protect``, nor lie inside one except under a path of
  ``allow_inside`` (a run's own ``export/`` folder, say).
  """
  for p in protect:
    if not p or '://' in p:
      continue
    if _inside(p, final):
      raise UserError(f'{final} is or holds {p}: writing the {what} there would '
                      f'replace it. Pick an output directory outside {p}.')
    if _inside(final, p) and not any(_inside(final, ok) for ok in allow_inside):
      where = (f' (inside {p} only under {", ".join(allow_inside)})'
               if allow_inside else '')
      raise UserError(f'{final} lies inside {p}: the {what} would be mixed into '
                      f'it. Pick an output directory outside it{where}.')
  if not os.path.exists(final):
    return
  if not os.path.isdir(final):
    raise UserError(f'{final} exists and is a file, not a directory; pick another path.')
  if not os.listdir(final):
    return
  if marker is None:
    raise UserError(f'{final} exists and is not empty; nothing was written. Pick a '
                    'new or empty directory.')
  if not os.path.exists(os.path.join(final, marker)):
    raise UserError(f'{final} exists and is not an earlier {what} of llm_jax (it has '
                    f'no {marker}); nothing was written or removed. Pick a new or '
                    'empty directory.')


@contextlib.contextmanager
def atomic_dir(final: str, *, overwrite: bool = False, marker: str | None = None,
               protect: tuple[str, ...] = (), allow_inside: tuple[str, ...] = (),
               what: str = 'output') -> Iterator[str]:
  """Yields a temporary directory that becomes ``final`` when the block succeeds.

  Args:
    final: the directory to create.
    overwrite: replace an existing, non-empty ``final`` that holds ``marker``
      (the old one is removed only after the new one is in place); without it
      a non-empty ``final`` is refused.
    marker: the file that marks ``final`` as an earlier output of this kind.
    protect: directories ``final`` must not be, hold or lie inside...
    allow_inside: ...except under these paths.
    what: the kind of output, for messages (e.g. 'export').

  On an error inside the block the temporary directory is removed and
  ``final`` is untouched.
  """
  final = os.path.abspath(final)
  check_replaceable(final, marker=marker if overwrite else None, protect=protect,
                    allow_inside=allow_inside, what=what)
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.tmp-{os.path.basename(final)}-', dir=parent)
  try:
    yield tmp
    _fsync_tree(tmp)
    os.chmod(tmp, 0o755 & ~_umask())
    _swap_into_place(tmp, final)
    _fsync_dir(parent)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _swap_into_place(tmp: str, final: str) -> None:
  """Renames ``tmp`` to ``final``; an old ``final`` is removed only afterwards."""
  old = None
  if os.path.exists(final):
    if not os.listdir(final):
      os.rmdir(final)
    else:
      old = tempfile.mkdtemp(prefix=f'.{os.path.basename(final)}.old-',
                             dir=os.path.dirname(final))
      os.rename(final, os.path.join(old, 'x'))
  os.rename(tmp, final)
  if old:
    shutil.rmtree(old, ignore_errors=True)


# ---- Locks.


class FileLock:
  """An exclusive ``flock`` on ``path`` (created if missing), held until ``release``.

  The lock file is never removed: removing it while another process waits
  on it would let a third process lock a new file of the same name, and two
  would hold "the" lock. On a filesystem without locks (some network mounts)
  ``acquire`` logs a warning and proceeds unlocked, as before locks existed.
  """

  def __init__(self, path: str):
    self.path = os.fspath(path)
    self._fd: int | None = None

  def acquire(self, *, wait: bool = True, note: str = '') -> bool:
    """Takes the lock; returns False if ``wait`` is False and another holds it.

    Args:
      wait: block until the holder releases it (True), or return at once.
      note: text written into the lock file once it is held (who holds it),
        which ``holder()`` reads back for another process's message.
    """
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
      os.close(fd)
      return False
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        os.close(fd)
        raise
      logging.warning('Cannot lock %s (%s); going on without the lock.', self.path,
                      e.strerror)
    if note:
      os.ftruncate(fd, 0)
      os.pwrite(fd, note.encode('utf-8'), 0)
    self._fd = fd
    return True

  def holder(self) -> str:
    """The note of whoever holds the lock ('' if none was written)."""
    try:
      with open(self.path, encoding='utf-8', errors='replace') as f:
        return f.read().strip()
    except OSError:
      return ''

  def release(self) -> None:
    """Releases the lock (closing the file releases the flock)."""
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> 'FileLock':
    self.acquire(wait=True)
    return self

  def __exit__(self, *exc) -> None:
    self.release()
