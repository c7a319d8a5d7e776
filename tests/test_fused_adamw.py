"""The fused CPU AdamW update (llm_jax/training/fused_adamw.py) against Optax's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_jax.core import configuration
from llm_jax.model import cpu_matmul
from llm_jax.training import fused_adamw
from llm_jax.training import optim
from llm_jax.training import sharding
from llm_jax.training import trainer

VOCAB = 512
needs_mkl = pytest.mark.skipif(not cpu_matmul.available(),
                               reason='the oneMKL custom call did not build here')


def _config(state_dtype='float32', clip_norm=1.0, backend='auto'):
  c = configuration.load_preset('tiny')
  c.optim.warmup_steps = 1
  c.optim.state_dtype = state_dtype
  c.optim.clip_norm = clip_norm
  c.model.cpu_matmul = backend
  return c


def _params():
  ks = jax.random.split(jax.random.key(0), 4)
  return {'embed': jax.random.normal(ks[0], (64, 16)),
          'blocks': {0: {'kernel': jax.random.normal(ks[1], (16, 4, 8)),
                         'bias': jax.random.normal(ks[2], (32,))}},
          'norm': jnp.ones((16,))}


def _grads(scale, seed):
  return jax.tree.map(lambda p: scale * jax.random.normal(jax.random.key(seed), p.shape),
                      _params())


def _run(config, update, grad_scales, finites):
  """Applies updates with given gradients; returns (params, opt_state) per step."""
  tx = optim.make_optimizer(config.optim, config.train.steps)

  @jax.jit
  def step(params, opt_state, grads, finite):
    norm = optax.tree.norm(grads)
    finite = finite & jnp.isfinite(norm)
    if update is None:
      updates, new_state = tx.update(grads, opt_state, params)
      keep = lambda n, o: jax.tree.map(lambda a, b: jnp.where(finite, a, b), n, o)  # noqa: E731
      return keep(optax.apply_updates(params, updates), params), keep(new_state, opt_state)
    return update(tx, grads, opt_state, params, norm, finite)

  params = _params()
  opt_state = tx.init(params)
  out = []
  for i, (scale, finite) in enumerate(zip(grad_scales, finites)):
    params, opt_state = step(params, opt_state, _grads(scale, i), jnp.asarray(finite))
    out.append(jax.tree.map(np.asarray, (params, opt_state)))
  return out


@needs_mkl
@pytest.mark.parametrize('state_dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('clip_norm', [1.0, 0.0])
def test_updates_equal_optax(state_dtype, clip_norm):
  config = _config(state_dtype, clip_norm)
  schedule = optim.learning_rate_schedule(config.optim, config.train.steps)
  fused = fused_adamw.make_update(config, schedule)
  assert fused is not None
  # Gradients far above the clip norm, then below it; a non-finite step in between.
  scales, finites = (30.0, 1e-3, 5.0, 1.0), (True, True, False, True)
  got = _run(config, fused, scales, finites)
  want = _run(config, None, scales, finites)
  for (gp, gs), (wp, ws) in zip(got, want):
    assert jax.tree.structure(gs) == jax.tree.structure(ws)
    for g, w in zip(jax.tree.leaves((gp, gs)), jax.tree.leaves((wp, ws))):
      assert g.dtype == w.dtype and g.shape == w.shape
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                 rtol=2e-6, atol=1e-7)
  # The non-finite step changed nothing, counts included.
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(got[2])):
    np.testing.assert_array_equal(a, b)
  # And the steps around it did change the weights.
  assert not np.array_equal(got[0][0]['embed'], got[1][0]['embed'])


def test_not_used_with_xla_backend_or_lora():
  schedule = lambda count: 0.1  # noqa: E731
  assert fused_adamw.make_update(_config(backend='xla'), schedule) is None
  c = _config()
  c.lora.rank = 4
  assert fused_adamw.make_update(c, schedule) is None


def _train(config, num_devices=1, steps=3, fused=True, monkeypatch=None):
  if not fused:
    monkeypatch.setattr(fused_adamw, 'make_update', lambda *a: None)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:num_devices])
  tr = trainer.Trainer.build(config, VOCAB, mesh)
  if not fused:
    monkeypatch.undo()
  state = tr.init_fn()
  tokens = np.random.default_rng(0).integers(0, VOCAB, (8, 65), dtype=np.int32)
  batch = sharding.global_batch({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]},
                                tr.batch_sharding)
  hlo = tr.step_fn.lower(state, batch).compile().as_text()
  losses = []
  for _ in range(steps):
    state, m = tr.step_fn(state, batch)
    losses.append(float(m['loss']))
  return np.array(losses), jax.tree.map(np.asarray, state.params), hlo


def _moment_copies(hlo: str) -> int:
  return sum(1 for line in hlo.splitlines()
             if ' copy(' in line and ('__mu__' in line or '__nu__' in line))


@needs_mkl
def test_train_step_equals_optax_and_copies_no_moments(monkeypatch):
  config = _config()
  got, got_params, hlo = _train(config)
  want, want_params, ref_hlo = _train(config, fused=False, monkeypatch=monkeypatch)
  assert got[-1] < got[0]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # The two programs' gradients differ in rounding (different fusions), and
  # Adam turns a near-zero gradient's rounding into steps up to 1e-7 (one
  # clean-clone CI run: 1 element of 12,288 off by 1.1e-7). A wrong update
  # is off by about the learning rate (5e-3 here) on every element.
  for g, w in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  # Optax's path copies every old moment before updating it in place; the
  # fused update reads them where they are.
  assert hlo.count('custom_call_target="llm_jax_cpu_adamw"') == len(jax.tree.leaves(got_params))
  assert _moment_copies(ref_hlo) > 0
  assert _moment_copies(hlo) == 0


@needs_mkl
def test_meshes_of_several_devices_use_optax():
  # Not yet on meshes: see fused_adamw.make_update.
  config = _config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  _, _, hlo = _train(config, num_devices=8, steps=1)
  assert 'llm_jax_cpu_adamw' not in hlo
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:8])
  assert fused_adamw.make_update(config, lambda count: 0.1, mesh) is None
