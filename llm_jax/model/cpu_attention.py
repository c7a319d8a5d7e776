"""Fused attention on CPU through oneMKL (``config.model.cpu_matmul``).

XLA:CPU runs ``attention.xla_attend`` as batched einsums with layout copies
around them and a separate softmax; on this project's 2-core Xeon that took
1.8x PyTorch's fused ``scaled_dot_product_attention`` per layer, forward and
backward (docs/performance.md, "Attention on CPU"). ``attend`` runs the same
maths as one custom call per pass (``csrc/cpu_attention.cc``): per batch row
and head, a block of query rows meets the keys in one oneMKL gemm read straight
from the ``[B, T, N, H]`` arrays, is masked and soft-maxed in float32, and meets
the values in a second gemm; causal runs skip the key blocks after the
diagonal. The backward pass recomputes the probabilities from the saved
log-sum-exp, so nothing ``[T, S]``-sized is kept between the passes.

It runs where ``model.cpu_matmul`` puts matmuls on oneMKL ('auto' or 'mkl')
and the devices are CPUs; everywhere else (TPU, GPU, ``cpu_matmul='xla'``, the
library could not be built, other dtypes) ``attention.xla_attend`` runs, with
the same numbers within float rounding. The choice is made per platform when
the step is lowered (``jax.lax.platform_dependent``), so GPUs and TPUs never
see the call. On a device mesh each device attends over its own rows and
heads (``custom_partitioning``); under ``vmap`` the mapped axis joins the
batch axis.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_jax.model import attention
from llm_jax.model import cpu_matmul

_FWD = 'llm_jax_cpu_attention_fwd'
_BWD = 'llm_jax_cpu_attention_bwd'
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def use_kernel(backend: str, dtype) -> bool:
  """Whether ``backend`` (a ``model.cpu_matmul`` value) runs attention in ``dtype`` fused."""
  if backend == 'xla' or jnp.dtype(dtype) not in _DTYPES:
    return False
  if backend == 'auto' and jax.default_backend() != 'cpu':
    return False  # A GPU or TPU host: do not even build the library.
  return cpu_matmul.available()


# ---- The two custom calls, on one device's arrays.


def _fwd_call(q, k, v, mask, causal: bool, scale: float):
  B, T, N, _ = q.shape
  out = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, T), jnp.float32))
  return jax.ffi.ffi_call(_FWD, out)(q, k, v, mask, causal=causal, scale=np.float32(scale))


def _bwd_call(q, k, v, mask, o, lse, do, causal: bool, scale: float):
  out = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
         jax.ShapeDtypeStruct(v.shape, v.dtype))
  return jax.ffi.ffi_call(_BWD, out)(q, k, v, mask, o, lse, do, causal=causal,
                                     scale=np.float32(scale))


# ---- Partitioning over a device mesh: batch rows and heads stay where they are.


def _axes_of(spec, dim):
  spec = tuple(spec) + (None,) * 4
  return spec[dim]


def _plan(arg_shapes):
  """(batch axes, head axes) from q's and k's shardings."""
  specs = [a.sharding.spec if isinstance(a.sharding, NamedSharding) else P()
           for a in arg_shapes[:2]]
  batch = _axes_of(specs[0], 0)
  heads = _axes_of(specs[0], 2)
  if heads is not None and _axes_of(specs[1], 2) != heads:
    heads = None  # Query and key/value heads split differently: keep them whole.
  return batch, heads


def _shardings(mesh, batch, heads, mask_batched: bool):
  qkv = NamedSharding(mesh, P(batch, None, heads, None))
  mask = NamedSharding(mesh, P(batch if mask_batched else None, None, None))
  lse = NamedSharding(mesh, P(batch, heads, None))
  return qkv, mask, lse


@functools.cache
def _forward_op(causal: bool, scale: float, mask_batched: bool):
  op = custom_partitioning(lambda q, k, v, mask: _fwd_call(q, k, v, mask, causal, scale))

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    qkv, _, lse = _shardings(mesh, *_plan(arg_shapes), mask_batched)
    return qkv, lse

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    qkv, mask, lse = _shardings(mesh, *_plan(arg_shapes), mask_batched)
    lower = lambda q, k, v, m: _fwd_call(q, k, v, m, causal, scale)  # noqa: E731
    return mesh, lower, (qkv, lse), (qkv, qkv, qkv, mask)

  m = 'b' if mask_batched else 'x'
  op.def_partition(partition=partition, infer_sharding_from_operands=infer,
                   sharding_rule=f'b t n h, b s k h, b s k h, {m} t s -> b t n h, b n t')
  batchable = jax.custom_batching.custom_vmap(op)
  batchable.def_vmap(functools.partial(_fold_vmap, op=batchable, n_out=2))
  return batchable


@functools.cache
def _backward_op(causal: bool, scale: float, mask_batched: bool):
  op = custom_partitioning(
      lambda q, k, v, mask, o, lse, do: _bwd_call(q, k, v, mask, o, lse, do, causal, scale))

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    qkv, _, _ = _shardings(mesh, *_plan(arg_shapes), mask_batched)
    return qkv, qkv, qkv

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    qkv, mask, lse = _shardings(mesh, *_plan(arg_shapes), mask_batched)
    lower = lambda *a: _bwd_call(*a, causal, scale)  # noqa: E731
    return mesh, lower, (qkv, qkv, qkv), (qkv, qkv, qkv, mask, qkv, lse, qkv)

  m = 'b' if mask_batched else 'x'
  op.def_partition(
      partition=partition, infer_sharding_from_operands=infer,
      sharding_rule=(f'b t n h, b s k h, b s k h, {m} t s, b t n h, b n t, b t n h '
                     '-> b t n h, b s k h, b s k h'))
  batchable = jax.custom_batching.custom_vmap(op)
  batchable.def_vmap(functools.partial(_fold_vmap, op=batchable, n_out=3))
  return batchable


def _fold_vmap(axis_size, in_batched, *args, op, n_out):
  """Under ``vmap``: the mapped axis V joins the batch axis B (row v * B + b)."""
  rows = args[0].shape[1] if in_batched[0] else args[0].shape[0]
  folded = []
  for i, (x, batched) in enumerate(zip(args, in_batched)):
    if i == 3 and not batched:  # The mask, the same for every v.
      folded.append(x if x.shape[0] == 1 else jnp.tile(x, (axis_size, 1, 1)))
      continue
    if not batched:
      x = jnp.broadcast_to(x, (axis_size,) + x.shape)
    if i == 3:  # A mask per v: one per row, too.
      x = jnp.broadcast_to(x, (axis_size, rows) + x.shape[2:])
    folded.append(x.reshape((axis_size * rows,) + x.shape[2:]))
  outs = op(*folded)
  return tuple(y.reshape((axis_size, rows) + y.shape[1:]) for y in outs), (True,) * n_out


# ---- The differentiable attention.


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(q, k, v, mask, causal):
  o, _ = _forward_op(causal, q.shape[-1] ** -0.5, mask.shape[0] > 1)(q, k, v, mask)
  return o


def _fused_fwd(q, k, v, mask, causal):
  o, lse = _forward_op(causal, q.shape[-1] ** -0.5, mask.shape[0] > 1)(q, k, v, mask)
  return o, (q, k, v, mask, o, lse)


def _fused_bwd(causal, res, do):
  q, k, v, mask, o, lse = res
  op = _backward_op(causal, q.shape[-1] ** -0.5, mask.shape[0] > 1)
  dq, dk, dv = op(q, k, v, mask, o, lse, do.astype(q.dtype))
  return dq, dk, dv, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
           mask_BTS: jax.Array, *, causal: bool, backend: str = 'xla') -> jax.Array:
  """``attention.xla_attend``'s result, fused on CPU where ``backend`` allows it.

  Args:
    q_BTNH: queries, already rotated, in the compute dtype.
    k_BSKH: keys, already rotated; K divides N.
    v_BSKH: values.
    mask_BTS: True where query t may attend to key s; B may be 1.
    causal: the mask allows no key after its query (then key blocks past the
      diagonal are skipped).
    backend: ``config.model.cpu_matmul`` ('xla' always runs ``xla_attend``).

  Returns:
    ``[B, T, N, H]`` in the queries' dtype.
  """
  dtypes = {q_BTNH.dtype, k_BSKH.dtype, v_BSKH.dtype}
  if len(dtypes) != 1 or not use_kernel(backend, q_BTNH.dtype):
    return attention.xla_attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
  mask_BTS = mask_BTS.astype(jnp.bool_)

  def fused(q, k, v, mask):
    return _fused(q, k, v, mask, causal)

  return jax.lax.platform_dependent(q_BTNH, k_BSKH, v_BSKH, mask_BTS, cpu=fused,
                                    default=attention.xla_attend)
