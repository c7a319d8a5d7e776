"""Chunked cross-entropy: the unchunked loss and gradients, a quarter of the memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.training import objectives as loss_lib
from llm_jax.training import trainer
from llm_jax.core.errors import UserError


def _unchunked(hidden_BTD, head_DV, targets_BT, weights_BT):
  logits_BTV = jnp.einsum('BTD,DV->BTV', hidden_BTD, head_DV,
                          preferred_element_type=jnp.float32)
  ce_BT = -jnp.take_along_axis(jax.nn.log_softmax(logits_BTV), targets_BT[..., None],
                               axis=-1)[..., 0]
  return jnp.sum(ce_BT * weights_BT), jnp.sum(weights_BT)


def _mean(fn, **kw):
  def mean_loss(hidden, head, targets, weights):
    total, count = fn(hidden, head, targets, weights, **kw)
    return total / count
  return mean_loss


def test_chunked_equals_unchunked_loss_and_grads_with_weights():
  B, T, D, V = 2, 32, 16, 300
  k = jax.random.split(jax.random.key(0), 4)
  hidden = jax.random.normal(k[0], (B, T, D))
  head = jax.random.normal(k[1], (D, V)) * 0.3
  targets = jax.random.randint(k[2], (B, T), 0, V)
  weights = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)
  want, want_g = jax.value_and_grad(_mean(_unchunked), argnums=(0, 1))(
      hidden, head, targets, weights)
  for chunk in (8, 32):
    got, got_g = jax.jit(jax.value_and_grad(
        _mean(loss_lib.chunked_cross_entropy, chunk=chunk), argnums=(0, 1)))(
            hidden, head, targets, weights)
    np.testing.assert_allclose(got, want, atol=1e-5)
    for g, w in zip(got_g, want_g):
      np.testing.assert_allclose(g, w, atol=1e-5)
  # No weights means all ones, the same as loss_lib.cross_entropy.
  total, count = loss_lib.chunked_cross_entropy(hidden, head, targets, chunk=8)
  logits = jnp.einsum('BTD,DV->BTV', hidden, head)
  ref_total, ref_count = loss_lib.cross_entropy(logits, targets)
  np.testing.assert_allclose(total, ref_total, rtol=1e-5)
  assert float(count) == float(ref_count) == B * T


def test_train_step_with_chunked_loss_matches(tiny_config):
  from llm_jax.perf import measure as bench  # pylint: disable=g-import-not-at-top
  from llm_jax.training import sharding  # pylint: disable=g-import-not-at-top
  results = []
  for chunk in (0, 16):
    config = tiny_config(train__loss_chunk=chunk)
    tr = trainer.Trainer.build(config, 128, sharding.make_mesh(config.mesh))
    state, batch = tr.init_fn(), bench.random_batch(tr, config)
    _, m = tr.step_fn(state, batch)
    results.append((float(m['loss']), float(m['grad_norm'])))
  np.testing.assert_allclose(results[1], results[0], rtol=1e-5)


def _temp_bytes(fn, *shapes) -> int:
  args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
  grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
  return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_peak_memory_is_under_a_quarter_for_a_128k_vocab():
  # Abstract shapes only: a 128k vocabulary, sequence 2048, batch 8, and a
  # tiny width so it compiles fast. Full fp32 logits alone are 8 GiB here.
  B, T, D, V = 8, 2048, 8, 131072
  shapes = [((B, T, D), jnp.float32), ((D, V), jnp.float32),
            ((B, T), jnp.int32), ((B, T), jnp.float32)]
  full = _temp_bytes(_mean(_unchunked), *shapes)
  chunked = _temp_bytes(_mean(loss_lib.chunked_cross_entropy, chunk=256), *shapes)
  assert full >= B * T * V * 4, full  # It does hold the [B, T, V] logits.
  assert chunked < full / 4, (chunked / 2**30, full / 2**30)


def test_a_chunk_that_does_not_divide_the_sequence_is_refused():
  with pytest.raises(UserError, match=r'train.loss_chunk=24 must divide .* 64.*such as 16'):
    loss_lib.chunked_cross_entropy(jnp.zeros((1, 64, 4)), jnp.zeros((4, 8)),
                                   jnp.zeros((1, 64), jnp.int32), chunk=24)
