"""Meshes from config: same losses on every mesh, shards as the rules say, clear errors."""

import json
import os

import jax
import numpy as np
import pytest

from llm_jax.core import configuration
from llm_jax.training import sharding
from llm_jax.training import trainer
from llm_jax.core.errors import UserError

VOCAB = 512


def tiny_config(data=1, fsdp=1, tensor=1, accum=1):
  c = configuration.load_preset('tiny')
  c.optim.warmup_steps = 1
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  c.optim.grad_accum_steps = accum
  return c


def five_step_losses(config, num_devices):
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:num_devices])
  tr = trainer.Trainer.build(config, VOCAB, mesh)
  state = tr.init_fn()
  # One fixed batch, five times: memorisable, so the loss must fall.
  tokens = np.random.default_rng(0).integers(0, VOCAB, (8, 65), dtype=np.int32)
  losses = []
  for _ in range(5):
    batch = sharding.global_batch(
        {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}, tr.batch_sharding)
    state, m = tr.step_fn(state, batch)
    losses.append(float(m['loss']))
  return np.array(losses), state, mesh


@pytest.fixture(scope='module')
def single_device_losses():
  return five_step_losses(tiny_config(), 1)[0]


@pytest.mark.parametrize('data, fsdp, tensor, accum', [
    (8, 1, 1, 1), (1, 8, 1, 1), (2, 2, 2, 1), (1, 4, 2, 1), (2, 2, 2, 2)])
def test_every_mesh_gives_the_one_device_losses(single_device_losses, data, fsdp,
                                                tensor, accum):
  losses, state, mesh = five_step_losses(tiny_config(data, fsdp, tensor, accum), 8)
  np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5)
  assert losses[-1] < losses[0]
  # Each parameter's local shard has the shape its logical axes dictate.
  q = state.params['blocks'][0]['attn']['q']['kernel']  # [D, N, H]: embed, heads
  assert q.addressable_shards[0].data.shape == (64 // fsdp, 4 // tensor, 16)
  emb = state.params['embed']['table']  # [V, D]: vocab, embed
  assert emb.addressable_shards[0].data.shape == (VOCAB // tensor, 64 // fsdp)


def test_fsdp_splits_params_and_optimizer_state_eight_ways():
  _, replicated_state, _ = five_step_losses(tiny_config(data=8), 8)
  _, fsdp_state, _ = five_step_losses(tiny_config(fsdp=8), 8)
  full = sharding.addressable_bytes((replicated_state.params, replicated_state.opt_state))
  split = sharding.addressable_bytes((fsdp_state.params, fsdp_state.opt_state))
  # Norm scales stay replicated, hence the 5% allowance.
  assert split <= full / 8 * 1.05, (split, full)


def test_mesh_that_does_not_divide_the_devices():
  with pytest.raises(UserError, match='does not divide the 8 devices'):
    sharding.make_mesh(tiny_config(data=-1, tensor=3).mesh)
  with pytest.raises(UserError, match='has 4 slots but there are 8 devices'):
    sharding.make_mesh(tiny_config(data=2, fsdp=2).mesh)


def test_tensor_axis_that_does_not_divide_the_heads():
  config = tiny_config(data=2, tensor=3)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:6])
  with pytest.raises(UserError, match=r"along its '(kv_)?heads' axis, which the mesh "
                     r'splits 3 ways over tensor \(mesh.tensor=3\)'):
    trainer.Trainer.build(config, VOCAB, mesh)


def test_batch_that_does_not_split_over_the_mesh():
  config = tiny_config(data=8)
  config.train.batch_size = 12
  with pytest.raises(UserError, match='make train.batch_size a multiple of 8'):
    trainer.Trainer.build(config, VOCAB, sharding.make_mesh(config.mesh))


GOLDEN_SPECS = os.path.join(os.path.dirname(__file__), 'golden', 'partition_specs.json')


def partition_specs(config) -> dict:
  """'path/to/param' -> its PartitionSpec (as lists) under config.mesh.rules."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from llm_jax.model import transformer as model  # pylint: disable=g-import-not-at-top
  cfg = model.ModelConfig.from_config(config.model, vocab_size=1024, max_len=64)
  _, abstract = nnx.split(nnx.eval_shape(lambda: model.Transformer(cfg, rngs=nnx.Rngs(0))))
  names = sharding.param_names(abstract)
  flat = jax.tree_util.tree_flatten_with_path(
      names, is_leaf=lambda x: isinstance(x, tuple))[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in path):
          [list(a) if isinstance(a, tuple) else a
           for a in sharding.logical_to_spec(n, config.mesh.rules)]
          for path, n in flat}


def test_partition_specs_match_the_golden_file():
  """Alarms when a parameter's sharding changes (a renamed axis, a new rule).

  If the change is intended, regenerate with LLM_JAX_UPDATE_GOLDEN=1 pytest
  tests/test_sharding.py and review the diff of the JSON file.
  """
  specs = {}
  for style in ('base', 'gpt2_style'):
    config = configuration.load_preset(style)
    config.model.num_layers = 1  # Every block is the same.
    specs[style] = partition_specs(config)
  if os.environ.get('LLM_JAX_UPDATE_GOLDEN') == '1':
    with open(GOLDEN_SPECS, 'w') as f:  # One parameter per line: diffs read well.
      f.write('{\n' + ',\n'.join(
          f' "{style}": {{\n' + ',\n'.join(
              f'  {json.dumps(k)}: {json.dumps(v)}' for k, v in sorted(d.items()))
          + '\n }' for style, d in sorted(specs.items())) + '\n}\n')
  with open(GOLDEN_SPECS) as f:
    golden = json.load(f)
  for style in specs:
    changed = {k: (golden[style].get(k), v) for k, v in specs[style].items()
               if golden[style].get(k) != v}
    missing = set(golden[style]) - set(specs[style])
    assert not changed and not missing, (
        f'{style}: parameter shardings drifted from {GOLDEN_SPECS} '
        f'(golden, now): {changed}; gone: {missing}')
