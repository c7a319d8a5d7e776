"""Orbax checkpoints of the train state plus JSON metadata; nothing else touches Orbax.

A checkpoint holds the whole ``TrainState`` (params, optimizer state, step, RNG)
and a JSON ``meta`` item: the resolved config, the tokenizer and data hashes
and library versions. Because the batch at step ``s`` is a pure function of
``(seed, s)`` (see ``data/pipeline.py``), the step is all the data position a
resume needs.
"""

import concurrent.futures
import errno
import logging
import os
import sys
import time
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llm_jax.core.errors import CheckpointWriteError
from llm_jax.core.errors import UserError

# Config sections that must match for a checkpoint to load into a run.
# ('prune': keep_zeros adds keep masks to the optimizer state; 'objective':
# DPO/GRPO add a reference copy of the parameters.)
_MUST_MATCH = ('model', 'lora', 'prune', 'objective')
# Orbax's names: the marker written last into a finished step directory, and
# the infix of a step directory still being written.
_COMMIT_MARKER = 'commit_success.txt'
_TMP_MARK = 'orbax-checkpoint-tmp'


class _OneLineOrbaxErrors(logging.Filter):
  """Drops Orbax's own error records; shortens its warnings to one line each.

  Every Orbax failure reaches us as an exception (a failed async save at the
  next ``save``, ``wait`` or ``close``), which the user sees once, as a
  UserError naming the checkpoint that is still whole. Orbax also logs the
  same failure itself, four records per failed save from its worker threads
  (each with a stack trace), which would bury that one line.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if f'{os.sep}orbax{os.sep}' not in record.pathname:
      return True
    if record.levelno >= logging.ERROR:
      return False
    if record.levelno >= logging.WARNING:
      record.msg = (record.getMessage().splitlines() or [''])[0][:300]
      record.args, record.exc_info, record.exc_text = (), None, None
    return True


class _NoTensorStoreEchoes(logging.Filter):
  """Drops asyncio's 'Future exception was never retrieved' for TensorStore writes.

  When a volume goes away mid-save, every array's write fails on Orbax's
  event loop and asyncio logs each one (about 40 lines apiece) after the
  save's one failure has already reached us.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return 'tensorstore' not in record.getMessage()


def _drop_closed_loop_echoes(previous):
  """An unraisable hook that ignores TensorStore callbacks on Orbax's closed loop.

  A failed save closes Orbax's event loop while TensorStore still completes
  the other writes; each completion raises 'Event loop is closed' in a thread
  of its own (a hundred tracebacks), which says nothing the one error does not.
  """

  def hook(unraisable):
    if (isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == 'Event loop is closed'):
      return
    previous(unraisable)

  hook.llm_jax_closed_loop = True
  return hook


def _quiet_orbax_tracebacks() -> None:
  for name in ('absl', 'orbax'):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _OneLineOrbaxErrors) for f in logger.filters):
      logger.addFilter(_OneLineOrbaxErrors())
  logger = logging.getLogger('asyncio')
  if not any(isinstance(f, _NoTensorStoreEchoes) for f in logger.filters):
    logger.addFilter(_NoTensorStoreEchoes())
  if not getattr(sys.unraisablehook, 'llm_jax_closed_loop', False):
    sys.unraisablehook = _drop_closed_loop_echoes(sys.unraisablehook)


def committed(step_dir: str) -> bool:
  """Whether a step directory holds Orbax's commit marker (written last)."""
  return (epath.Path(step_dir) / _COMMIT_MARKER).exists()


class _StateHandler(ocp.StandardCheckpointHandler):
  """Orbax's StandardCheckpointHandler, writing each replicated array once, whole.

  By default Orbax cuts an array replicated over several devices into one
  piece per replica, so that several hosts share the writing ("replica
  parallel"), and each piece is cut by a program compiled for it. In one
  process nothing is shared: on a mesh of 8 CPU devices the first save of
  configs/tiny.py compiled 64 such programs, 4.1 s against 0.03 s without.
  The files are the same, and the checkpoint names Orbax's own handler, so
  plain Orbax reads it.
  """

  @classmethod
  def typestr(cls) -> str:
    return ocp.StandardCheckpointHandler.typestr()

  def __init__(self):
    super().__init__()
    from orbax.checkpoint._src.metadata import array_metadata_store  # pylint: disable=g-import-not-at-top
    handlers = [(ty, ocp.type_handlers.get_type_handler(ty))
                for ty in (int, float, bytes, np.number, np.ndarray, str)]
    handlers.append((jax.Array, ocp.type_handlers.ArrayHandler(
        use_replica_parallel=False, array_metadata_store=array_metadata_store.Store())))
    self._impl = ocp.PyTreeCheckpointHandler(
        use_ocdbt=True, type_handler_registry=ocp.type_handlers.create_type_handler_registry(
            *handlers))


def _handlers() -> ocp.handlers.CheckpointHandlerRegistry | None:
  """The state's handler: whole arrays in one process, Orbax's default with several."""
  if jax.process_count() > 1:
    return None
  try:
    state = _StateHandler()
  except (AttributeError, ImportError, TypeError) as e:  # Another Orbax: its default path.
    logging.info('Orbax replica-parallel saves stay on (%s).', e)
    return None
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
    registry.add('state', args, state)
  meta = ocp.JsonCheckpointHandler()
  for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
    registry.add('meta', args, meta)
  return registry


class _SaveFailed(Exception):
  """A save that failed, with its step (made a UserError in the main thread)."""

  def __init__(self, step: int, error: Exception):
    super().__init__(step, error)
    self.step, self.error = step, error


class Checkpointer:
  """Saves every N steps (async), keeps the last K, restores the latest."""

  def __init__(self, directory: str, *, every: int, keep: int, keep_every: int = 0):
    # Local paths are made absolute; gs:// and other remote paths pass as they are.
    self.directory = directory if '://' in directory else os.path.abspath(directory)
    self.every = every
    _quiet_orbax_tracebacks()
    try:
      epath.Path(self.directory).mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise UserError(f'Cannot create the checkpoint directory {self.directory}: '
                      f'{e}. Pick a writable --workdir.') from e
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_every or None, create=True,
            enable_async_checkpointing=True),
        handler_registry=_handlers())
    # Steps known to be on disk whole, newest first, and the one save whose
    # Orbax call returned but whose commit is not yet confirmed (Orbax
    # finishes a save before it starts the next, so one at most).
    self._complete = [s for s in self.all_steps() if self.is_committed(s)]
    self._pending = None
    self._reported = False  # A failed save has reached the caller as an error.
    # On CPU, Orbax's synchronous part of an async save (per-array metadata,
    # replica slices, the copy to host, its worker threads) held the loop for
    # 14-17% of a base.py step. There the state is first copied (one jitted
    # copy, a few ms) and the whole Orbax call runs on one worker thread of
    # ours; the copy is what makes it safe, since the next step donates the
    # state's buffers. On accelerators the copy would double the state's
    # device memory, so Orbax's own path (device-to-host copy, then async
    # writes) stays in the caller's thread; so it does with several
    # processes, whose collectives (the train step's and any Orbax runs) must
    # start in the same order everywhere, which two threads cannot promise.
    self._background = (jax.process_count() == 1 and
                        all(d.platform == 'cpu' for d in jax.devices()))
    self._worker = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix='llm_jax-checkpoint') if self._background else None
    self._job = None  # Future of the Orbax call on the worker.
    self._copy = None  # Future of the compiled copy (see ``prepare``).

  def all_steps(self) -> list[int]:
    """Steps Orbax lists (finished renames), newest first."""
    return sorted(self._manager.all_steps(), reverse=True)

  def is_committed(self, step: int) -> bool:
    """Whether the step's commit marker (written last by Orbax) is present."""
    return committed(str(epath.Path(self.directory) / str(step)))

  def warn_unfinished_saves(self) -> None:
    """Names temporary directories left by a process killed mid-save."""
    root = epath.Path(self.directory)
    for leftover in sorted(p.name for p in root.iterdir() if _TMP_MARK in p.name):
      logging.warning('Ignoring %s in %s: an unfinished save (the process was '
                      'stopped while writing it).', leftover, self.directory)

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts an async save of ``state`` at ``step``; returns once it is queued.

    Raises:
      UserError: the directory cannot be written now, or an earlier async save
        failed in the background. Either way the newest complete checkpoint
        is untouched and the message names it.
    """
    try:
      self._check_writable()
    except OSError as e:
      self._settle()  # Which earlier saves finished decides what the message names.
      raise self._save_failed(step, e) from None
    self._join()
    if self._background:
      snapshot = self._snapshot(state)  # The step after this one donates `state`.
      self._job = self._worker.submit(self._confirm_then_save, step, snapshot, meta)
    else:
      self._raise_as_user_error(self._confirm_then_save, step, state, meta)

  def prepare(self, state: Any) -> None:
    """Compiles the pre-save copy on the worker now (~0.1 s), not in the first save."""
    if self._background and self._copy is None:
      abstract = abstract_like(state)
      self._copy = self._worker.submit(lambda: _copy_tree.lower(abstract).compile())

  def _snapshot(self, state: Any) -> Any:
    if self._copy is not None:
      try:
        return self._copy.result()(state)
      except Exception:  # pylint: disable=broad-except
        self._copy = None  # Other shapes or shardings than prepared: jit's path.
    return _copy_tree(state)

  def _confirm(self) -> None:
    """Waits for Orbax to commit the pending save; then it counts as complete.

    Raises:
      _SaveFailed: naming the pending step, whose commit failed.
    """
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise _SaveFailed(step, e) from None
    self._complete.insert(0, step)

  def _confirm_then_save(self, step: int, state: Any, meta: dict) -> None:
    """The previous save's commit first (Orbax would wait for it anyway), then this one.

    Runs on the worker in the background mode; the main thread touches
    ``_pending`` and ``_complete`` only after joining it.
    """
    self._confirm()
    try:
      self._manager.save(
          step, force=True,
          args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # pylint: disable=broad-except
      raise _SaveFailed(step, e) from None
    self._pending = step

  def _raise_as_user_error(self, fn, *args) -> None:
    try:
      fn(*args)
    except _SaveFailed as failed:
      raise self._save_failed(failed.step, failed.error) from None

  def _join(self) -> None:
    """Waits for the worker's Orbax call (seconds ago; normally done)."""
    if self._job is None:
      return
    future, self._job = self._job, None
    self._raise_as_user_error(future.result)

  def _settle(self) -> None:
    """Lets every save in flight end, so ``_complete`` is the truth; never raises."""
    try:
      self._join()
      self._confirm()
    except Exception:  # pylint: disable=broad-except
      pass  # That save failed: it is not complete, which is all we needed.

  def _check_writable(self) -> None:
    """Writes and removes a small file, so a lost or read-only volume fails now.

    An async save would otherwise fail in a background thread and surface a
    whole save interval later.
    """
    probe = epath.Path(self.directory) / (
        f'.write-probe-{jax.process_index()}-{os.getpid()}')
    probe.write_text('ok')
    probe.unlink()

  def _save_failed(self, step: int, error: Exception) -> CheckpointWriteError:
    reason = getattr(error, 'strerror', None) or (
        str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    if 'RESOURCE_EXHAUSTED' in reason or getattr(error, 'errno', None) == errno.ENOSPC:
      # TensorStore reports a full disk (ENOSPC) as RESOURCE_EXHAUSTED.
      reason = 'no space left on the device (the disk is full)'
    self._reported = True  # close() need not log this failure again.
    good = [s for s in self._complete if s != step]
    last = (f'The newest complete checkpoint, step {good[0]}, is untouched'
            if good else 'No complete checkpoint exists yet')
    return CheckpointWriteError(
        f'Cannot write the checkpoint of step {step} to {self.directory}: '
        f'{reason}. {last}. Make the directory writable (permissions, free '
        'space, a mounted volume), then run the same command to resume.')

  def set_aside(self, step: int) -> str:
    """Renames an unreadable step's directory out of the way; never deletes it."""
    src = epath.Path(self.directory) / str(step)
    dst = src.with_name(f'{step}.unreadable-{int(time.time())}')
    src.rename(dst)
    self._manager.reload()
    return str(dst)

  def metadata(self, step: int) -> dict:
    return self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores ``step`` into the shapes, dtypes and shardings of ``abstract_state``."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
    return restored.state

  def wait(self) -> None:
    """Blocks until every queued save is committed to disk.

    Raises:
      UserError: a queued save failed (see ``save``).
    """
    self._join()
    self._raise_as_user_error(self._confirm)

  def close(self) -> None:
    """Finishes saves in flight and releases Orbax; on failure logs, never raises.

    The loop calls ``wait`` first, which reports a failed save; ``close``
    also runs while another error is on its way out and must not hide it.
    A failure already raised as an error is not logged again.
    """
    def warn(what, e):
      if not self._reported:
        logging.warning('%s: %s', what, e)

    if self._job is not None:
      future, self._job = self._job, None
      try:
        future.result()
      except _SaveFailed as e:
        warn('A checkpoint save did not finish', e.error)
    if self._worker is not None:
      self._worker.shutdown(wait=True)
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      warn('A checkpoint save did not finish', e)
    try:
      self._manager.close()
    except Exception as e:  # pylint: disable=broad-except
      warn('Closing the checkpoint manager failed', e)


@jax.jit
def _copy_tree(tree: Any) -> Any:
  """A copy of every array in new buffers, same shardings (one dispatch)."""
  return jax.tree.map(jnp.copy, tree)


def check_compatible(saved: dict, current: dict, directory: str) -> None:
  """Refuses a checkpoint whose model, tokenizer or data differ from the run's.

  Other differences (learning rate, total steps, ...) are deliberate changes:
  allowed, and listed in the log.

  Args:
    saved: the ``meta`` of the checkpoint.
    current: the ``meta`` this run would write.
    directory: where the checkpoint lives, for the message.

  Raises:
    UserError: naming the first differing key, with both values.
  """
  saved_flat, current_flat = flatten(saved['config']), flatten(current['config'])
  for key in sorted(set(saved_flat) | set(current_flat)):
    # A key the saved config lacks was added to configs/base.py since; its
    # default there keeps the old behaviour, so an older checkpoint still fits.
    if (key.split('.')[0] in _MUST_MATCH and key in saved_flat
        and saved_flat[key] != current_flat.get(key)):
      raise UserError(
          f'The checkpoint in {directory} was trained with {key}='
          f'{saved_flat.get(key)!r} but this run has {key}={current_flat.get(key)!r}. '
          'Use the same model config to resume, or a fresh --workdir.')
  # The data first: a tokenizer trained on other data differs as a result.
  for key, what in (('data_sha256', 'training data (content hash)'),
                    ('vocab_size', 'vocabulary size'),
                    ('tokenizer_sha256', 'tokenizer')):
    # None: the checkpoint was imported (llm_jax.convert), so it was trained
    # on no data of ours (and maybe with no SentencePiece tokenizer): any
    # data may continue it; the vocabulary size still has to fit.
    if saved.get(key) is not None and saved[key] != current[key]:
      raise UserError(
          f'The checkpoint in {directory} was trained with another {what} '
          f'({str(saved[key])[:16]} then, {str(current[key])[:16]} now). Use the '
          'same data and tokenizer settings to resume, or a fresh --workdir.')
  changed = [f'{k}: {saved_flat.get(k)!r} -> {current_flat.get(k)!r}'
             for k in sorted(set(saved_flat) | set(current_flat))
             if saved_flat.get(k) != current_flat.get(k)]
  if changed:
    logging.warning('Resuming with changed settings: %s', '; '.join(changed))


def flatten(tree: dict, sep: str = '.', prefix: str = '') -> dict:
  """A nested dict as one level: ``{'a': {'b': 1}}`` -> ``{'a.b': 1}``."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, sep, f'{prefix}{key}{sep}'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays, for restore."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def flatten_params(params: dict, prefix: str = '') -> dict[str, Any]:
  """``{'blocks': {0: {'attn': ...}}}`` -> ``{'blocks/0/attn/...': array}``."""
  return flatten(params, '/', prefix)


def unflatten_like(flat: dict[str, Any], like: dict, prefix: str = '') -> dict:
  """The nested dict shaped as ``like`` (int keys kept) with ``flat``'s values."""
  return {key: (unflatten_like(flat, value, f'{prefix}{key}/')
                if isinstance(value, dict) else flat[f'{prefix}{key}'])
          for key, value in like.items()}
