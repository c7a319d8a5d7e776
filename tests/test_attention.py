"""Attention backends behind one signature: equal to JAX's reference, clear errors."""

import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_jax.model import attention
from llm_jax.model import transformer as model
from llm_jax.core.errors import UserError

HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None
# libtpu takes a machine-wide lock by default; compiling for a topology needs
# no TPU, so let other processes (parallel test runs) hold it too.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')


def _qkv(B=2, T=16, N=4, K=2, H=8, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(k[0], (B, T, N, H)), jax.random.normal(k[1], (B, T, K, H)),
          jax.random.normal(k[2], (B, T, K, H)))


@pytest.mark.parametrize('num_kv_heads', [4, 2, 1])
def test_xla_backend_equals_jax_reference(num_kv_heads):
  q, k, v = _qkv(K=num_kv_heads)
  mask = attention.causal_mask(16)
  got = attention.attend(q, k, v, mask, backend='xla')
  want = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='xla')
  np.testing.assert_allclose(got, want, atol=1e-5)
  # A general mask (two packed segments) goes through unchanged too.
  seg = jnp.array([[0] * 6 + [1] * 10, [0] * 16])
  mask2 = attention.causal_mask(16) & (seg[:, :, None] == seg[:, None, :])
  got2 = attention.attend(q, k, v, mask2, backend='xla')
  want2 = jax.nn.dot_product_attention(q, k, v, mask=mask2[:, None], implementation='xla')
  np.testing.assert_allclose(got2, want2, atol=1e-5)


def test_auto_picks_per_platform():
  assert attention.resolve('auto', 'cpu') == 'xla'
  assert attention.resolve('auto', 'gpu') == 'cudnn'
  assert attention.resolve('auto', 'tpu') == 'splash'
  q, k, v = _qkv()
  np.testing.assert_array_equal(
      attention.attend(q, k, v, attention.causal_mask(16), backend='auto'),
      attention.attend(q, k, v, attention.causal_mask(16), backend='xla'))


@pytest.mark.parametrize('backend, needs', [('cudnn', 'GPU'), ('splash', 'TPU')])
def test_unavailable_backend_is_one_clear_error(backend, needs):
  q, k, v = _qkv()
  with pytest.raises(UserError, match=rf"model.attention='{backend}' needs a {needs} "
                     r"but this run's devices are 'cpu'; use model.attention='xla'"):
    attention.attend(q, k, v, attention.causal_mask(16), backend=backend)


def test_model_config_names_the_backends():
  base = dict(vocab_size=32, max_len=8, num_layers=1, d_model=16, num_heads=2,
              num_kv_heads=2, head_dim=8, mlp_dim=32, norm='rmsnorm', position='rope',
              mlp='swiglu', rope_theta=1e4, norm_eps=1e-6, tie_embeddings=False,
              use_bias=False, dtype='float32', init_std=0.02)
  with pytest.raises(UserError, match="model.attention='flash' is not one of"):
    model.ModelConfig(**base, attention='flash')
  cfg = model.ModelConfig(**base, attention='auto')
  m = model.Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.zeros((1, 8), jnp.int32)
  xla = nnx.merge(*nnx.split(model.Transformer(dataclasses.replace(cfg, attention='xla'),
                                               rngs=nnx.Rngs(0))))
  np.testing.assert_allclose(m(tokens), xla(tokens), atol=1e-6)


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed: pip install -e '.[tpu]'")
@pytest.mark.slow
def test_splash_compiles_for_a_tpu_slice():
  """Ahead of time, for a v5p slice that is not here (as llm_jax/training/aot.py does)."""
  from llm_jax.training import aot  # pylint: disable=g-import-not-at-top
  devices = aot.topology_devices('v5p:2x2x1')
  sharding = jax.sharding.SingleDeviceSharding(devices[0])
  B, T, N, K, H = 2, 512, 4, 2, 128
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sharding)
  mask = jax.ShapeDtypeStruct((1, T, T), jnp.bool_, sharding=sharding)

  def loss(q, k, v, m):
    out = attention.attend(q, k, v, m, backend='splash', platform='tpu')
    return jnp.sum(out.astype(jnp.float32))

  lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(
      shape(B, T, N, H), shape(B, T, K, H), shape(B, T, K, H), mask)
  # Forward and both backward kernels are Pallas calls, not XLA's einsums.
  for kernel in ('splash_mha_fwd', 'splash_mha_dq', 'splash_mha_dkv'):
    assert kernel in lowered.as_text(), kernel
  assert lowered.compile().memory_analysis().temp_size_in_bytes > 0
