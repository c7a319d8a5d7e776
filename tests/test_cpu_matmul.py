"""The oneMKL matmul (model.cpu_matmul): XLA's numbers, gradients, meshes, fallback."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_jax.core import configuration
from llm_jax.model import cpu_matmul
from llm_jax.model import transformer as model_lib
from llm_jax.training import sharding
from llm_jax.training import trainer

VOCAB = 512
needs_mkl = pytest.mark.skipif(not cpu_matmul.available(),
                               reason='the oneMKL custom call did not build here')


def _operands(dtype, m=48, k=40, n=24):
  k1, k2 = jax.random.split(jax.random.key(0))
  return (jax.random.normal(k1, (m, k)).astype(dtype),
          jax.random.normal(k2, (k, n)).astype(dtype))


def _loss_and_grads(backend, x, w, transpose_w=False):
  def loss(x, w):
    y = cpu_matmul.matmul(x, w, backend=backend, preferred_element_type=jnp.float32,
                          transpose_w=transpose_w)
    # A nonlinear loss: each output gets a different cotangent.
    return jnp.sum(jnp.sin(y))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)


def _rel(got, want):
  got, want = (np.asarray(a, np.float32) for a in (got, want))
  return np.linalg.norm(got - want) / np.linalg.norm(want)


def _custom_calls(fn, *args) -> int:
  return jax.jit(fn).lower(*args).as_text().count('llm_jax_cpu_matmul')


@needs_mkl
@pytest.mark.parametrize('transpose_w', [False, True])
@pytest.mark.parametrize('dtype, tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_forward_and_gradients_equal_xla(dtype, tol, transpose_w):
  x, w = _operands(dtype)
  if transpose_w:  # w given as [N, K], as the tied LM head passes its table.
    w = w.T.copy()
  f32 = lambda a, b: cpu_matmul.matmul(a, b, backend='mkl', transpose_w=transpose_w,  # noqa: E731
                                       preferred_element_type=jnp.float32)
  assert _custom_calls(f32, x, w) == 1
  # The transposed operand is read in place: the call takes the parameters
  # themselves, no transposed copy (a fusion, copy or transpose) before it.
  entry = jax.jit(f32).lower(x, w).compile().as_text().split('ENTRY')[1]
  assert not any(op in entry for op in (' fusion(', ' copy(', ' transpose(')), entry
  got_y = f32(x, w)
  want_y = jnp.dot(x, w.T if transpose_w else w, preferred_element_type=jnp.float32)
  assert _rel(got_y, want_y) < (1e-6 if dtype == jnp.float32 else 1e-3)
  (got, got_g), (want, want_g) = (_loss_and_grads(b, x, w, transpose_w)
                                  for b in ('mkl', 'xla'))
  assert abs(float(got) - float(want)) <= tol * abs(float(want)) + 1e-4
  for g, r in zip(got_g, want_g):
    assert g.dtype == r.dtype == dtype
    # bf16: the cotangent is rounded to bf16 for the product (as in autocast).
    assert _rel(g, r) < tol


@needs_mkl
def test_result_dtype_and_vmap():
  x, w = _operands(jnp.bfloat16)
  y = cpu_matmul.matmul(x, w, backend='mkl')
  assert y.dtype == jnp.bfloat16
  xs = jnp.stack([x, 2 * x, -x])
  got = jax.vmap(lambda a: cpu_matmul.matmul(a, w, backend='mkl',
                                             preferred_element_type=jnp.float32))(xs)
  want = jnp.einsum('bmk,kn->bmn', xs, w, preferred_element_type=jnp.float32)
  assert _rel(got, want) < 1e-3


def _config(backend, dtype='float32', data=1, fsdp=1, tensor=1):
  c = configuration.load_preset('tiny')
  c.optim.warmup_steps = 1
  c.model.cpu_matmul = backend
  c.model.dtype = dtype
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  return c


def _losses(config, num_devices, steps=3):
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:num_devices])
  tr = trainer.Trainer.build(config, VOCAB, mesh)
  state = tr.init_fn()
  tokens = np.random.default_rng(0).integers(0, VOCAB, (8, 65), dtype=np.int32)
  batch = sharding.global_batch({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]},
                                tr.batch_sharding)
  losses = []
  for _ in range(steps):
    state, m = tr.step_fn(state, batch)
    losses.append(float(m['loss']))
  return np.array(losses), tr, state, batch


@needs_mkl
def test_bfloat16_train_step_losses_equal_xla():
  # (float32: the mesh test below compares oneMKL losses with XLA's to 1e-5.)
  want = _losses(_config('xla', 'bfloat16'), 1)[0]
  got, tr, state, batch = _losses(_config('mkl', 'bfloat16'), 1)
  np.testing.assert_allclose(got, want, rtol=2e-3)
  assert got[-1] < got[0]
  # Every projection, the MLP and the tied/untied head, forward and backward.
  assert tr.step_fn.lower(state, batch).as_text().count('llm_jax_cpu_matmul') >= 3 * 7


@pytest.mark.slow  # 10-25 s on 2 cores; runs in CI with the full suite.
@needs_mkl
def test_eight_device_mesh_gives_one_device_losses_on_local_shards():
  # Tied embeddings: the LM head multiplies by the vocab-split table's
  # transpose in place (transpose_w), the other layers as Dense.
  want_config, got_config = _config('xla'), _config('mkl', data=2, fsdp=2, tensor=2)
  want_config.model.tie_embeddings = got_config.model.tie_embeddings = True
  want = _losses(want_config, 1)[0]
  got, _, _, _ = _losses(got_config, 8)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Data parallel: each device multiplies its own 64 rows of the 8 x 64 tokens.
  mesh = jax.make_mesh((8,), ('data',))
  x, w = _operands(jnp.float32, m=512, k=32, n=16)
  x = jax.device_put(x, NamedSharding(mesh, P('data')))
  grad = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.sin(cpu_matmul.matmul(
      a, b, backend='mkl'))), argnums=(0, 1)))
  hlo = grad.lower(x, w).compile().as_text()
  assert 'all-gather' not in hlo
  assert hlo.count('custom_call_target="llm_jax_cpu_matmul"') == 3
  assert 'f32[64,16]{1,0} custom-call' in hlo


def test_xla_backend_and_missing_library_fall_back_to_jnp_dot(monkeypatch, caplog):
  x, w = _operands(jnp.float32)
  assert _custom_calls(lambda a, b: cpu_matmul.matmul(a, b, backend='xla'), x, w) == 0

  def no_mkl():
    raise RuntimeError('the mkl wheel is not installed')

  monkeypatch.setattr(cpu_matmul, '_mkl_paths', no_mkl)
  cpu_matmul.available.cache_clear()
  try:
    with caplog.at_level(logging.WARNING):
      y = cpu_matmul.matmul(x, w, backend='mkl')
      assert _custom_calls(lambda a, b: cpu_matmul.matmul(a, b, backend='mkl'), x, w) == 0
  finally:
    cpu_matmul.available.cache_clear()
  assert 'mkl wheel is not installed' in caplog.text
  assert caplog.text.count('unavailable') == 1  # One warning, not one per call.
  np.testing.assert_array_equal(y, jnp.dot(x, w))


@needs_mkl
def test_with_xla_matmuls_leaves_no_custom_call_for_export():
  cfg = model_lib.ModelConfig.from_config(_config('mkl').model, vocab_size=VOCAB,
                                          max_len=16)
  from flax import nnx  # pylint: disable=import-outside-toplevel
  graphdef, params = nnx.split(model_lib.Transformer(cfg, rngs=nnx.Rngs(0)))
  tokens = jnp.zeros((2, 16), jnp.int32)

  def calls(gd):
    return _custom_calls(lambda p, t: nnx.merge(gd, p)(t), params, tokens)

  assert calls(graphdef) > 0
  assert calls(model_lib.with_xla_matmuls(graphdef, params)) == 0


@needs_mkl
def test_auto_is_mkl_for_both_dtypes_on_a_cpu_host():
  rows = cpu_matmul.AUTO_MIN_ROWS
  for dtype, calls in ((jnp.float32, 1), (jnp.bfloat16, 1), (jnp.float16, 0)):
    x, w = _operands(dtype, m=rows)
    assert _custom_calls(lambda a, b: cpu_matmul.matmul(a, b, backend='auto'), x, w) == calls
    # A decoding step's few rows stay on XLA's dot ('mkl' still calls oneMKL).
    x, w = _operands(dtype, m=8)
    assert _custom_calls(lambda a, b: cpu_matmul.matmul(a, b, backend='auto'), x, w) == 0
    assert _custom_calls(lambda a, b: cpu_matmul.matmul(a, b, backend='mkl'), x, w) == calls


@needs_mkl
def test_onemkl_threads_do_not_spin_after_a_call():
  # Spinning OpenMP threads took the cores from XLA's: the bf16 step 1.4x slower.
  import os  # pylint: disable=import-outside-toplevel
  assert os.environ.get('KMP_BLOCKTIME') == '0'


def test_bfloat16_on_a_cpu_without_bf16_units_gets_one_clear_warning(tmp_path, caplog):
  plain, amx = tmp_path / 'avx2', tmp_path / 'amx'
  plain.write_text('processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f\n')
  amx.write_text('processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n')
  assert cpu_matmul.cpu_has_bf16_units(str(plain)) is False
  assert cpu_matmul.cpu_has_bf16_units(str(amx)) is True
  assert cpu_matmul.cpu_has_bf16_units(str(tmp_path / 'missing')) is None
  with caplog.at_level(logging.WARNING):
    assert cpu_matmul.warn_if_bf16_is_emulated(jnp.bfloat16, str(plain))
    assert not cpu_matmul.warn_if_bf16_is_emulated(jnp.float32, str(plain))
    assert not cpu_matmul.warn_if_bf16_is_emulated(jnp.bfloat16, str(amx))
    assert not cpu_matmul.warn_if_bf16_is_emulated(jnp.bfloat16, str(tmp_path / 'missing'))
  warnings = [r.getMessage() for r in caplog.records if 'bf16 units' in r.getMessage()]
  assert len(warnings) == 1 and '--config.model.dtype=float32' in warnings[0], warnings
