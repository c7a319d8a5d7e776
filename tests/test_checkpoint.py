"""training/checkpoint.py: an async save returns at once and survives the next step's donation."""

import jax
import numpy as np

from llm_jax.perf import measure
from llm_jax.training import checkpoint


def test_save_then_donating_step_restores_the_saved_state_bit_exact(tmp_path, tiny_config):
  config = tiny_config()
  tr = measure.build_trainer(config)
  state, batch = tr.init_fn(), measure.random_batch(tr, config)
  state, _ = tr.step_fn(state, batch)
  expected = jax.tree.map(np.array, jax.device_get(state))
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'c'), every=1, keep=3)
  ckpt.prepare(state)  # The copy compiled ahead on the worker thread, as the loop does.
  ckpt.save(1, state, {'step': 1})
  # The next steps donate `state`'s buffers while the save may still be running.
  for _ in range(2):
    state, _ = tr.step_fn(state, batch)
  ckpt.save(3, state, {'step': 3})
  ckpt.wait()
  assert ckpt.all_steps() == [3, 1] and ckpt.is_committed(1) and ckpt.is_committed(3)
  restored = ckpt.restore(1, tr.abstract_state())
  ckpt.close()
  got = jax.tree.map(np.asarray, jax.device_get(restored))
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  assert int(got.step) == 1


def test_copy_tree_makes_new_buffers_with_the_same_values():
  tree = {'w': jax.numpy.arange(6.0).reshape(2, 3), 'step': jax.numpy.int32(7)}
  copy = checkpoint._copy_tree(tree)  # pylint: disable=protected-access
  assert copy['w'].unsafe_buffer_pointer() != tree['w'].unsafe_buffer_pointer()
  np.testing.assert_array_equal(copy['w'], tree['w'])
  assert int(copy['step']) == 7


def test_a_replicated_state_saves_without_compiling_and_plain_orbax_reads_it(tmp_path):
  """In one process each array is written once, whole: no per-replica slice programs."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((8,), ('data',))
  replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec('data'))
  state = {f'layer{i}': {'w': jax.device_put(np.full((16, 8 + i), i, np.float32), replicated),
                         'b': jax.device_put(np.arange(8.0 * (i + 1), dtype=np.float32), split)}
           for i in range(6)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'c'), every=1, keep=3)
  ckpt.prepare(state)
  ckpt._copy.result()  # pylint: disable=protected-access  # The loop's copy, compiled ahead.
  compiles = []

  def listen(event, duration, **_):
    if event == '/jax/core/compile/backend_compile_duration':
      compiles.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    ckpt.save(1, state, {'step': 1})
    ckpt.wait()
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  ckpt.close()
  # Orbax's replica-parallel default compiled one slice per replicated shape and replica here.
  assert compiles == []
  plain = ocp.CheckpointManager(str(tmp_path / 'c'))
  got = plain.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  plain.close()
