"""Orbax checkpoints of the train state plus JSON metadata; nothing else touches Orbax.

A checkpoint holds the whole ``TrainState`` (params, optimizer state, step, RNG)
and a JSON ``meta`` item: the resolved config, the tokenizer and data hashes
and library versions. Because the batch at step ``s`` is a pure function of
``(seed, s)`` (see ``data/pipeline.py``), the step is all the data position a
resume needs.
"""

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from llm_jax.errors import UserError

# Config sections that must match for a checkpoint to load into a run.
_MUST_MATCH = ('model',)


class Checkpointer:
  """Saves every N steps (async), keeps the last K, restores the latest."""

  def __init__(self, directory: str, *, every: int, keep: int):
    self.directory = os.path.abspath(directory)
    self.every = every
    try:
      os.makedirs(self.directory, exist_ok=True)
    except OSError as e:
      raise UserError(f'Cannot create the checkpoint directory {self.directory}: '
                      f'{e.strerror}. Pick a writable --workdir.') from e
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts an async save of ``state`` at ``step``; returns once it is queued."""
    self._manager.save(
        step, force=True,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                meta=ocp.args.JsonSave(meta)))

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
    """Blocks until every queued save is committed to disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def check_compatible(saved: dict, current: dict, directory: str) -> None:
  """Refuses a checkpoint whose model or tokenizer differ from the run's.

  Args:
    saved: the ``meta`` of the checkpoint.
    current: the ``meta`` this run would write.
    directory: where the checkpoint lives, for the message.

  Raises:
    UserError: naming the first differing key, with both values.
  """
  for section in _MUST_MATCH:
    old, new = saved['config'][section], current['config'][section]
    for key in sorted(set(old) | set(new)):
      if old.get(key) != new.get(key):
        raise UserError(
            f'The checkpoint in {directory} was trained with {section}.{key}='
            f'{old.get(key)!r} but this run has {section}.{key}={new.get(key)!r}. '
            'Use the same model config to resume, or a fresh --workdir.')
  for key in ('tokenizer_sha256', 'vocab_size'):
    if saved[key] != current[key]:
      raise UserError(
          f'The checkpoint in {directory} was trained with another tokenizer '
          f'({key} {saved[key]} vs {current[key]} now). Use the same data and '
          'tokenizer settings to resume, or a fresh --workdir.')
  if saved['data_sha256'] != current['data_sha256']:
    logging.warning('Resuming on different data than the checkpoint saw '
                    '(data hash %s..., now %s...).',
                    saved['data_sha256'][:12], current['data_sha256'][:12])


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays, for restore."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
