"""optim.state_dtype: Adam moments stored in bf16, updates as in float32."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from llm_jax.training import optim
from llm_jax.core.errors import UserError


def _optim_cfg(state_dtype):
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-2, warmup_steps=1, min_lr_ratio=0.1, b1=0.9, b2=0.95,
      eps=1e-8, weight_decay=0.1, clip_norm=1.0, grad_accum_steps=1,
      state_dtype=state_dtype))


def test_bf16_state_halves_moment_memory_and_keeps_updates_close():
  params = {'w': jnp.linspace(-1, 1, 64).reshape(8, 8), 'b': jnp.ones(8)}
  grads = jax.tree.map(lambda p: 0.1 * jnp.cos(3 * p), params)
  results = {}
  for dtype in ('float32', 'bfloat16'):
    tx = optim.make_optimizer(_optim_cfg(dtype), total_steps=10)
    state = tx.init(params)
    p = params
    for _ in range(3):
      updates, state = jax.jit(tx.update)(grads, state, p)
      p = jax.tree.map(jnp.add, p, updates)
    floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert {x.dtype for x in floats} == {jnp.dtype(dtype)}, dtype
    results[dtype] = p
  for a, b in zip(jax.tree.leaves(results['bfloat16']), jax.tree.leaves(results['float32'])):
    np.testing.assert_allclose(a, b, atol=2e-4)


def test_unknown_state_dtype_is_refused():
  with pytest.raises(UserError, match="optim.state_dtype='float16' is not one of"):
    optim.make_optimizer(_optim_cfg('float16'), total_steps=10)
