"""A run's compiled steps in ``<workdir>/xla_cache``: JAX's persistent cache, scoped to the run.

A restarted run reads its compiled steps from there (those that took JAX's
threshold, 1 s by default, to compile) instead of compiling them again. Three things about JAX's cache need care here:

- JAX opens its cache once per process, at the first directory it is given, so
  a second run in the same process (a notebook, a sweep's trials) would write
  into the first run's directory. ``scoped`` reopens it at this run's directory
  and gives the caller's own cache (``JAX_COMPILATION_CACHE_DIR``) back after.
- The CPU kernels' custom partitionings (``model/cpu_matmul.py``,
  ``model/cpu_attention.py``, ``training/fused_adamw.py``) put the address of a
  Python object into the program, so on a mesh of several CPU devices no key
  ever matched and each start only added entries. JAX can leave that address out of the key
  (``jax_remove_custom_partitioning_ptr_from_cache_key``); the partitioning
  rules are then not in the key, so the entries go to a subdirectory named by a
  digest of the modules that define them: a changed rule never reads a program
  partitioned by the old one. The executables themselves hold the partitioned
  calls, not the Python rules.
- JAX writes an entry in place, not to a temporary file renamed when whole, and
  never replaces an entry that exists. A run killed while writing one left it cut
  off, and every later start warned about it and compiled that step again.
  ``scoped`` removes such entries first, so the step is compiled and kept once more.
"""

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
from collections.abc import Iterator

import jax
from jax.experimental.compilation_cache import compilation_cache

try:  # The decompression JAX applies to its own entries (zstd or zlib, as it chose).
  from jax._src.compilation_cache import decompress_executable
except ImportError:  # Another JAX: entries are then left as they are.
  decompress_executable = None

log = logging.getLogger(__name__)

# The modules whose jax.experimental.custom_partitioning rules the key leaves out.
_PARTITIONING_MODULES = ('llm_jax.model.cpu_matmul', 'llm_jax.model.cpu_attention',
                         'llm_jax.training.fused_adamw')
_IGNORE_POINTERS = 'jax_remove_custom_partitioning_ptr_from_cache_key'


@functools.cache
def rules_digest() -> str:
  """A digest of the source of the modules that define custom partitionings."""
  h = hashlib.sha256()
  for name in _PARTITIONING_MODULES:
    with open(importlib.util.find_spec(name).origin, 'rb') as f:
      h.update(f.read())
  return h.hexdigest()[:16]


def directory(workdir: str) -> str:
  """Where a run in ``workdir`` keeps its compiled steps."""
  return os.path.join(workdir, 'xla_cache', rules_digest())


def drop_torn(path: str) -> list[str]:
  """Removes the entries in ``path`` that were cut off while being written; returns their names."""
  if decompress_executable is None or not os.path.isdir(path):
    return []
  torn = []
  for name in sorted(os.listdir(path)):
    if not name.endswith('-cache'):
      continue
    entry = os.path.join(path, name)
    try:
      with open(entry, 'rb') as f:
        decompress_executable(f.read())
    except OSError:
      continue  # Unreadable here (permissions, a file being removed): JAX will say so itself.
    except Exception:  # noqa: BLE001 - zlib.error, zstd's own error: the entry is incomplete.
      for gone in (entry, entry[:-len('-cache')] + '-atime'):
        with contextlib.suppress(FileNotFoundError):
          os.remove(gone)
      torn.append(name)
  if torn:
    log.warning('Removed %d compiled step(s) from %s that an earlier start left half-written '
                '(stopped while saving them); they are compiled and saved again now: %s',
                len(torn), path, ', '.join(torn))
  return torn


@contextlib.contextmanager
def scoped(workdir: str) -> Iterator[str]:
  """JAX's persistent cache at ``directory(workdir)`` inside, the caller's after."""
  before_dir = jax.config.jax_compilation_cache_dir
  before_ignore = getattr(jax.config, _IGNORE_POINTERS, None)
  path = directory(workdir)
  drop_torn(path)
  compilation_cache.reset_cache()
  jax.config.update('jax_compilation_cache_dir', path)
  if before_ignore is not None:  # A JAX without the option: the cache still works elsewhere.
    jax.config.update(_IGNORE_POINTERS, True)
  try:
    yield path
  finally:
    compilation_cache.reset_cache()
    jax.config.update('jax_compilation_cache_dir', before_dir)
    if before_ignore is not None:
      jax.config.update(_IGNORE_POINTERS, before_ignore)
