"""Training and eval batches: index-based, deterministic, per host.

The token shards are one long virtual sequence cut into windows of
``seq_len + 1`` tokens (window ``i`` starts at token ``i * seq_len``; adjacent
windows share one token, so every token is a target exactly once per epoch).
The example at global position ``i = step * global_batch + b`` is window
``perm(seed, i // num_windows)[i % num_windows]``: a pure function of
``(seed, step, b)``. A resumed run therefore needs only the step to see
exactly the batches an uninterrupted run would, and each host computes only
its own rows of the global batch.

A background thread gathers upcoming batches while the device computes
(``prefetch``). It is plain Python, not a tf.data map over a Python
callback: tearing such an iterator down waits for TensorFlow's threads to
finish their calls into Python, which kept a stopped run from exiting for
up to half a minute after its last checkpoint.
"""

import functools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from llm_jax.data import batch as batch_lib
from llm_jax.data import shards as shards_lib
from llm_jax.data.batch import Batch
from llm_jax.core.errors import UserError

_PERMUTATION_CACHE_SIZE = 4  # A batch spans at most two epochs; keep a few.
# Batches gathered ahead of the step that takes them: gathering one is a
# memmap fancy-index read, far shorter than a step, so a few hide it.
_PREFETCH = 4


class TokenWindows:
  """Fixed-length windows over shard files, read through memmaps (no copy)."""

  def __init__(self, shard_paths: Sequence[str], dtype, seq_len: int):
    """Maps the shards.

    Args:
      shard_paths: Shard files, in order; they are one virtual sequence.
      dtype: Their token dtype (``PreparedData.dtype``).
      seq_len: Tokens per training example; a window holds ``seq_len + 1``.

    Raises:
      UserError: the shards hold too few tokens for a single window.
    """
    if seq_len < 1:
      raise UserError(f'data.seq_len={seq_len} must be at least 1')
    self.seq_len = seq_len
    self._shards = [shards_lib.load_shard(p, dtype) for p in shard_paths]
    self._shards = [s for s in self._shards if s.size]
    sizes = [s.size for s in self._shards]
    # _offsets[k] is the global position of shard k's first token.
    self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    self.total_tokens = int(self._offsets[-1])
    self.num_windows = max(0, (self.total_tokens - 1) // seq_len)
    if self.num_windows < 1:
      raise UserError(
          f'the token shards hold {self.total_tokens} tokens, too few for one '
          f'window of data.seq_len={seq_len} (+1 target) tokens; lower '
          '--config.data.seq_len or add data (for validation, raise '
          'data.val_fraction)')

  def window(self, i: int) -> np.ndarray:
    """Tokens ``[i * seq_len, i * seq_len + seq_len + 1)`` as int32."""
    return self.gather(np.asarray([i]))[0]

  def gather(self, indices) -> np.ndarray:
    """Windows ``indices`` as an int32 array ``[len(indices), seq_len + 1]``."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size and (indices.min() < 0
                         or indices.max() >= self.num_windows):
      raise IndexError(f'window indices must be in [0, {self.num_windows})')
    positions = (indices[:, None] * self.seq_len
                 + np.arange(self.seq_len + 1, dtype=np.int64))
    if len(self._shards) == 1:  # The common case: one fancy-index read.
      return np.array(self._shards[0][positions], dtype=np.int32)
    out = np.empty(positions.shape, np.int32)
    shard_of = np.searchsorted(self._offsets, positions, side='right') - 1
    # A window can span shards; read each shard's part with one index op.
    for k in np.unique(shard_of):
      mask = shard_of == k
      out[mask] = self._shards[k][positions[mask] - self._offsets[k]]
    return out


@functools.lru_cache(maxsize=_PERMUTATION_CACHE_SIZE)
def _permutation(seed: int, epoch: int, num_windows: int) -> np.ndarray:
  perm = np.random.default_rng([seed, epoch]).permutation(num_windows)
  perm.flags.writeable = False  # Shared by every caller through the cache.
  return perm


def _host_rows(global_batch: int, process_index: int,
               process_count: int) -> tuple[int, int]:
  """This host's rows ``[lo, hi)`` of the global batch."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise UserError(f'process_index={process_index} must be in '
                    f'[0, process_count={process_count})')
  if global_batch % process_count:
    raise UserError(f'the global batch (train.batch_size={global_batch}) must '
                    f'be divisible by the number of hosts ({process_count})')
  return (process_index * global_batch // process_count,
          (process_index + 1) * global_batch // process_count)


def batch_indices(step: int, *, global_batch: int, num_windows: int,
                  seed: int, process_index: int = 0,
                  process_count: int = 1) -> np.ndarray:
  """Window indices of this host's rows of the batch for ``step`` (pure).

  Args:
    step: Training step (0-based).
    global_batch: Examples per step, all hosts together.
    num_windows: ``TokenWindows.num_windows``.
    seed: The data-order seed (``config.seed``).
    process_index: This host.
    process_count: Number of hosts.

  Returns:
    int64 array of ``global_batch // process_count`` window indices.

  Raises:
    UserError: global_batch is not divisible by process_count.
  """
  lo, hi = _host_rows(global_batch, process_index, process_count)
  positions = step * global_batch + np.arange(lo, hi, dtype=np.int64)
  epochs, within = np.divmod(positions, num_windows)
  out = np.empty_like(positions)
  for epoch in np.unique(epochs):
    mask = epochs == epoch
    out[mask] = _permutation(seed, int(epoch), num_windows)[within[mask]]
  return out


def split_windows(windows: np.ndarray) -> Batch:
  return batch_lib.check({'inputs': np.ascontiguousarray(windows[:, :-1], np.int32),
                          'targets': np.ascontiguousarray(windows[:, 1:], np.int32)})


def make_batch(windows: TokenWindows, step: int, *, global_batch: int,
               seed: int, process_index: int = 0,
               process_count: int = 1) -> Batch:
  """This host's batch for ``step``: ``{'inputs', 'targets'}``, int32 [B, T].

  ``targets`` is ``inputs`` shifted left by one token. This is the reference
  that ``train_batches`` serves from its prefetch thread.
  """
  indices = batch_indices(step, global_batch=global_batch,
                          num_windows=windows.num_windows, seed=seed,
                          process_index=process_index,
                          process_count=process_count)
  return split_windows(windows.gather(indices))


def train_batches(windows: TokenWindows, *, global_batch: int, seed: int,
                  start_step: int, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
  """Endless batches for steps ``start_step, start_step + 1, ...``.

  A background thread gathers the batches of the next few steps (in order)
  while the device runs the current one; the batch for step ``s`` equals
  ``make_batch(windows, s, ...)``.

  Yields:
    ``{'inputs': int32[B, T], 'targets': int32[B, T]}`` with
    ``B = global_batch // process_count`` and ``T = windows.seq_len``.
  """
  _host_rows(global_batch, process_index, process_count)  # Fails here, not in the thread.
  return prefetch(functools.partial(
      make_batch, windows, global_batch=global_batch, seed=seed,
      process_index=process_index, process_count=process_count), start_step)


def prefetch(make: Callable[[int], dict], start_step: int,
             depth: int = _PREFETCH) -> Iterator[dict]:
  """``make(start_step), make(start_step + 1), ...``, computed ``depth`` ahead.

  One daemon thread calls ``make`` in step order; its errors surface in the
  consumer at the step they belong to. Closing the generator (or dropping
  it) stops the thread within one ``make`` call: no Python callback runs
  inside a TensorFlow thread pool, whose teardown at exit could wait on it.
  """
  ready: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def work():
    step = start_step
    while not stop.is_set():
      try:
        item = (make(step), None)
      except Exception as e:  # pylint: disable=broad-except
        item = (None, e)
      while not stop.is_set():
        try:
          ready.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if item[1] is not None:
        return
      step += 1

  thread = threading.Thread(target=work, name='llm_jax-batches', daemon=True)
  thread.start()
  try:
    while True:
      batch, error = ready.get()
      if error is not None:
        raise error
      yield batch
  finally:
    stop.set()
    thread.join(timeout=10)


def eval_batches(windows: TokenWindows, *, global_batch: int,
                 num_batches: int, process_index: int = 0,
                 process_count: int = 1) -> list[dict]:
  """The fixed validation batches: windows spread evenly over the split.

  ``num_batches * global_batch`` windows at evenly spaced indices (every
  window, wrapping round, when there are fewer), so every eval pass sees the
  same data and a few unusual documents at the start of the split (a codec's
  mapping table, say) cannot dominate the figure. Returns this host's rows of
  each batch, in the ``make_batch`` format.
  """
  lo, hi = _host_rows(global_batch, process_index, process_count)
  total = num_batches * global_batch
  if total >= windows.num_windows:
    chosen = np.arange(total) % windows.num_windows
  else:
    chosen = (np.arange(total) * windows.num_windows) // total
  batches = []
  for k in range(num_batches):
    indices = chosen[k * global_batch + np.arange(lo, hi)]
    batches.append(split_windows(windows.gather(indices)))
  return batches
