"""Tests of llm_jax/data/pipeline.py: windows, deterministic order, hosts."""

import numpy as np
import pytest

from llm_jax.data import pipeline
from llm_jax.core.errors import UserError

SEQ_LEN = 8


def _write_shards(tmp_path, tokens: np.ndarray, sizes) -> list[str]:
  """Writes ``tokens`` as consecutive uint16 shard files of ``sizes``."""
  paths, start = [], 0
  for k, size in enumerate(sizes):
    path = tmp_path / f'train-{k:05d}-of-{len(sizes):05d}.bin'
    tokens[start:start + size].astype('<u2').tofile(path)
    paths.append(str(path))
    start += size
  assert start == tokens.size
  return paths


@pytest.fixture
def tokens():
  # Distinct, recognisable ids: token at position p is p (mod 2**16).
  return np.arange(1000, dtype=np.int64) % 2**16


@pytest.fixture
def windows(tmp_path, tokens):
  return pipeline.TokenWindows(_write_shards(tmp_path, tokens, [1000]),
                               np.uint16, SEQ_LEN)


def test_windows_cover_the_tokens(windows, tokens):
  assert windows.num_windows == (1000 - 1) // SEQ_LEN
  for i in [0, 1, 57, windows.num_windows - 1]:
    w = windows.window(i)
    assert w.dtype == np.int32 and w.shape == (SEQ_LEN + 1,)
    np.testing.assert_array_equal(w, tokens[i * SEQ_LEN:(i + 1) * SEQ_LEN + 1])
  with pytest.raises(IndexError):
    windows.gather([windows.num_windows])


def test_windows_span_shard_boundaries(tmp_path, tokens, windows):
  split = pipeline.TokenWindows(
      _write_shards(tmp_path, tokens, [5, 300, 1, 7, 687]), np.uint16,
      SEQ_LEN)
  assert split.num_windows == windows.num_windows
  everything = np.arange(windows.num_windows)
  np.testing.assert_array_equal(split.gather(everything),
                                windows.gather(everything))


def test_too_few_tokens_is_a_user_error(tmp_path, tokens):
  paths = _write_shards(tmp_path, tokens[:SEQ_LEN], [SEQ_LEN])
  with pytest.raises(UserError, match=f'{SEQ_LEN} tokens.*seq_len={SEQ_LEN}'):
    pipeline.TokenWindows(paths, np.uint16, SEQ_LEN)


def _indices(step, **kw):
  return pipeline.batch_indices(step, **kw)


def test_batch_indices_are_pure():
  kw = dict(global_batch=6, num_windows=50, seed=3)
  for step in [0, 1, 8, 9, 1000]:
    a, b = _indices(step, **kw), _indices(step, **kw)
    assert a.dtype == np.int64 and a.shape == (6,)
    np.testing.assert_array_equal(a, b)
    pipeline._permutation.cache_clear()  # Recomputed, still the same.
    np.testing.assert_array_equal(a, _indices(step, **kw))


@pytest.mark.parametrize('num_windows,global_batch', [(12, 4), (10, 4),
                                                      (7, 3), (5, 8)])
def test_each_epoch_is_a_permutation(num_windows, global_batch):
  steps = 3 * num_windows // global_batch + 2
  order = np.concatenate([
      _indices(s, global_batch=global_batch, num_windows=num_windows, seed=0)
      for s in range(steps)])
  for epoch in range(3):
    seen = order[epoch * num_windows:(epoch + 1) * num_windows]
    np.testing.assert_array_equal(np.sort(seen), np.arange(num_windows))
  if num_windows >= 5:  # Epochs are shuffled differently.
    assert not np.array_equal(order[:num_windows],
                              order[num_windows:2 * num_windows])


def test_different_seeds_give_different_orders():
  kw = dict(global_batch=16, num_windows=1000)
  orders = {tuple(_indices(0, seed=s, **kw)) for s in range(5)}
  assert len(orders) == 5


@pytest.mark.parametrize('process_count', [2, 4])
def test_host_slices_partition_the_global_batch(windows, process_count):
  kw = dict(global_batch=8, num_windows=windows.num_windows, seed=1)
  for step in [0, 5, 31]:
    whole = _indices(step, **kw)
    parts = [_indices(step, process_index=p, process_count=process_count,
                      **kw) for p in range(process_count)]
    assert all(len(p) == 8 // process_count for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert len(set(np.concatenate(parts).tolist())) == 8  # Disjoint.
    batches = [pipeline.make_batch(windows, step, global_batch=8, seed=1,
                                   process_index=p,
                                   process_count=process_count)
               for p in range(process_count)]
    np.testing.assert_array_equal(
        np.concatenate([b['inputs'] for b in batches]),
        pipeline.make_batch(windows, step, global_batch=8, seed=1)['inputs'])


def test_indivisible_global_batch_is_a_user_error():
  with pytest.raises(UserError, match='divisible'):
    _indices(0, global_batch=6, num_windows=50, seed=0, process_count=4)


def test_make_batch_targets_are_inputs_shifted(windows):
  batch = pipeline.make_batch(windows, 3, global_batch=4, seed=0)
  again = pipeline.make_batch(windows, 3, global_batch=4, seed=0)
  np.testing.assert_array_equal(batch['inputs'], again['inputs'])
  assert batch['inputs'].shape == batch['targets'].shape == (4, SEQ_LEN)
  assert batch['inputs'].dtype == batch['targets'].dtype == np.int32
  np.testing.assert_array_equal(batch['inputs'][:, 1:],
                                batch['targets'][:, :-1])
  idx = _indices(3, global_batch=4, num_windows=windows.num_windows, seed=0)
  np.testing.assert_array_equal(batch['inputs'],
                                windows.gather(idx)[:, :-1])
  np.testing.assert_array_equal(batch['targets'][:, -1],
                                windows.gather(idx)[:, -1])


@pytest.mark.parametrize('process_index,process_count', [(0, 1), (1, 2)])
def test_train_batches_match_make_batch(windows, process_index,
                                        process_count):
  kw = dict(global_batch=4, seed=7, process_index=process_index,
            process_count=process_count)
  start = 40  # Past one epoch (124 windows / 4 = 31 steps), mid-stream.
  it = pipeline.train_batches(windows, start_step=start, **kw)
  for step in range(start, start + 6):
    got = next(it)
    want = pipeline.make_batch(windows, step, **kw)
    assert set(got) == {'inputs', 'targets'}
    for k in want:
      assert got[k].dtype == np.int32
      np.testing.assert_array_equal(got[k], want[k], err_msg=f'step {step}')


def test_eval_batches_are_fixed_and_spread_over_the_split(windows):
  batches = pipeline.eval_batches(windows, global_batch=4, num_batches=3)
  again = pipeline.eval_batches(windows, global_batch=4, num_batches=3)
  assert len(batches) == 3
  # 12 of the 124 windows, evenly spaced: 0, 10, 20, ..., 113.
  chosen = np.arange(12) * windows.num_windows // 12
  assert chosen[-1] > windows.num_windows * 0.9
  for k, (a, b) in enumerate(zip(batches, again)):
    np.testing.assert_array_equal(a['inputs'], b['inputs'])
    np.testing.assert_array_equal(a['inputs'],
                                  windows.gather(chosen[4 * k:4 * k + 4])[:, :-1])
  half = pipeline.eval_batches(windows, global_batch=4, num_batches=3,
                               process_index=1, process_count=2)
  np.testing.assert_array_equal(half[2]['targets'],
                                batches[2]['targets'][2:])


def test_eval_batches_wrap_round(tmp_path, tokens):
  small = pipeline.TokenWindows(_write_shards(tmp_path, tokens[:41], [41]),
                                np.uint16, SEQ_LEN)
  assert small.num_windows == 5
  batches = pipeline.eval_batches(small, global_batch=4, num_batches=2)
  got = np.concatenate([b['inputs'] for b in batches])
  want = small.gather([0, 1, 2, 3, 4, 0, 1, 2])[:, :-1]
  np.testing.assert_array_equal(got, want)
