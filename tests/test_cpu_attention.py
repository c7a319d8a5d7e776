"""The fused CPU attention (model/cpu_attention.py): xla_attend's numbers, gradients, meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_jax.core import configuration
from llm_jax.model import attention
from llm_jax.model import cpu_attention
from llm_jax.model import cpu_matmul
from llm_jax.model import transformer as model_lib

pytestmark = pytest.mark.skipif(not cpu_matmul.available(),
                                reason='the oneMKL library did not build here')


def _qkv(B, T, N, K, H, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (jax.random.normal(ks[i], (B, T, n, H)).astype(dtype)
             for i, n in enumerate((N, K, K)))
  return q, k, v, jax.random.normal(ks[3], (B, T, N, H))


def _packed(B, T):
  """Three segments per row, the last one padding (id 0), lengths differing by row."""
  ids = np.zeros((B, T), np.int32)
  for b in range(B):
    a, c = T // 3 + b, 2 * T // 3 + b
    ids[b, :a], ids[b, a:c] = 1, 2
  return jnp.asarray(ids)


def _value_and_grads(fn, q, k, v, g):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * g)  # noqa: E731
  out = jax.jit(fn)(q, k, v)
  return (out, *jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))


def _rel(got, want):
  got, want = (np.asarray(a, np.float32) for a in (got, want))
  return np.abs(got - want).max() / np.abs(want).max()


@pytest.mark.parametrize('dtype, tol', [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize('T, N, K, causal, packed', [
    (70, 4, 2, True, False),     # grouped-query heads, T not a multiple of the row block
    (130, 4, 1, True, True),     # one key/value head, packed rows
    (96, 4, 4, False, True),     # an encoder: both ways, padding segments
])
def test_forward_and_gradients_equal_xla_attend(dtype, tol, T, N, K, causal, packed):
  q, k, v, g = _qkv(2, T, N, K, 16, dtype)
  mask = attention.attention_mask(_packed(2, T) if packed else None, causal, length=T)
  want = _value_and_grads(lambda q, k, v: attention.xla_attend(q, k, v, mask), q, k, v, g)
  fused = lambda q, k, v: cpu_attention.attend(q, k, v, mask, causal=causal, backend='mkl')  # noqa: E731
  got = _value_and_grads(fused, q, k, v, g)
  for name, a, b in zip(('out', 'dq', 'dk', 'dv'), got, want):
    assert a.dtype == b.dtype == dtype, name
    assert _rel(a, b) < tol, (name, _rel(a, b))
  hlo = jax.jit(jax.grad(lambda q: fused(q, k, v).astype(jnp.float32).sum())).lower(q).as_text()
  assert 'llm_jax_cpu_attention_fwd' in hlo and 'llm_jax_cpu_attention_bwd' in hlo


def test_xla_backend_runs_xla_attend():
  q, k, v, _ = _qkv(1, 8, 2, 2, 4, jnp.float32)
  mask = attention.causal_mask(8)
  fn = jax.jit(lambda q: cpu_attention.attend(q, k, v, mask, causal=True, backend='xla'))
  assert 'llm_jax_cpu_attention' not in fn.lower(q).as_text()
  np.testing.assert_array_equal(fn(q), attention.xla_attend(q, k, v, mask))


def test_vmap_folds_into_the_batch_axis():
  q, k, v, _ = _qkv(6, 40, 2, 1, 8, jnp.float32)
  mask = attention.attention_mask(_packed(6, 40), True)
  fused = lambda q, k, v, m: cpu_attention.attend(q, k, v, m, causal=True, backend='mkl')  # noqa: E731
  shape = lambda x: x.reshape((3, 2) + x.shape[1:])  # noqa: E731
  got = jax.vmap(fused)(shape(q), shape(k), shape(v), shape(mask))
  want = attention.xla_attend(q, k, v, mask)
  assert _rel(got.reshape(want.shape), want) < 2e-6


@pytest.mark.slow  # about 15 s on 2 cores; runs in CI with the full suite.
def test_eight_device_mesh_attends_on_local_rows_and_heads():
  q, k, v, g = _qkv(4, 64, 4, 2, 8, jnp.float32)
  mask = attention.attention_mask(_packed(4, 64), True)
  mesh = jax.make_mesh((4, 2), ('data', 'tensor'))
  heads = NamedSharding(mesh, P('data', None, 'tensor', None))
  qs, ks, vs, gs = (jax.device_put(x, heads) for x in (q, k, v, g))
  ms = jax.device_put(mask, NamedSharding(mesh, P('data')))
  fused = lambda q, k, v: cpu_attention.attend(q, k, v, ms, causal=True, backend='mkl')  # noqa: E731
  got = _value_and_grads(fused, qs, ks, vs, gs)
  want = _value_and_grads(lambda q, k, v: attention.xla_attend(q, k, v, mask), q, k, v, g)
  for a, b in zip(got, want):
    assert _rel(a, b) < 2e-6

  def loss(q, k, v, m, g):
    return jnp.sum(cpu_attention.attend(q, k, v, m, causal=True, backend='mkl') * g)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  hlo = grad.lower(qs, ks, vs, ms, gs).compile().as_text()
  assert 'all-gather' not in hlo
  # Each device: 1 of the 4 rows, 2 of the 4 query heads.
  assert '(f32[1,64,2,8]{3,2,1,0}, f32[1,2,64]{2,1,0}) custom-call' in hlo  # out, lse


def test_model_uses_it_unless_exported():
  c = configuration.load_preset('tiny')
  cfg = model_lib.ModelConfig.from_config(c.model, vocab_size=64, max_len=16)
  graphdef, params = nnx.split(model_lib.Transformer(cfg, rngs=nnx.Rngs(0)))
  tokens = jnp.zeros((2, 16), jnp.int32)

  def hlo(gd):
    return jax.jit(lambda p, t: nnx.merge(gd, p)(t)).lower(params, tokens).as_text()

  assert c.model.cpu_matmul == 'auto'
  assert 'llm_jax_cpu_attention_fwd' in hlo(graphdef)
  assert 'llm_jax_cpu_attention' not in hlo(model_lib.with_xla_matmuls(graphdef, params))


def test_auto_on_an_accelerator_host_never_builds_the_library(monkeypatch):
  def no_build():
    raise AssertionError('built the CPU library on a GPU host')

  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(cpu_matmul, 'available', no_build)
  assert not cpu_attention.use_kernel('auto', jnp.float32)
  assert not cpu_matmul.use_mkl('auto', jnp.bfloat16)
