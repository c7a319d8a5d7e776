"""Meshes from config: same losses on every mesh, shards as the rules say, clear errors."""

import jax
import numpy as np
import pytest

from llm_jax import configuration, sharding, trainer
from llm_jax.errors import UserError

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
