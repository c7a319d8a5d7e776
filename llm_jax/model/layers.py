"""The Transformer's building blocks: named parameters, Dense, Embed, Norm.

Every parameter carries its logical axis names as metadata (see the table in
``llm_jax/model/transformer.py``). ``transformer.py`` builds the model from
these layers, ``heads.py`` its heads, ``lora.py`` and pruning wrap ``Dense``.
Letters as in ``llm_jax/model/transformer.py``.
"""

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from llm_jax.model import cpu_matmul

if TYPE_CHECKING:
  from llm_jax.model.transformer import ModelConfig

# ---- Parameters with logical axis names.


def param(value: jax.Array, names: tuple[str | None, ...]) -> nnx.Param:
  """Wraps ``value`` as a Param whose metadata names its logical axes."""
  assert len(names) == value.ndim, (names, value.shape)
  # eager_sharding=False: keep the names as metadata only; without it flax
  # would try to place the array on a mesh that does not exist at init.
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


def normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float,
            names: tuple[str | None, ...]) -> nnx.Param:
  return param(std * jax.random.normal(rngs.params(), shape, jnp.float32),
                names)


def bias_names(names: tuple[str, ...]) -> tuple[str, ...]:
  # A [D] bias is replicated like the norm vectors (see the module docstring).
  return tuple('norm' if n == 'embed' else n for n in names)


class Dense(nnx.Module):
  """A dense layer with a multi-axis kernel applied as one 2-D matmul.

  The kernel keeps its named axes (``[D, N, H]`` for queries) so sharding and
  checkpoint import see heads, but the product runs as ``[M, D] @ [D, N*H]``:
  on XLA:CPU that made the whole train step 1.2x faster (docs/performance.md).

  Args:
    in_shape: the contracted axes of the kernel, e.g. ``(D,)`` or ``(N, H)``.
    out_shape: the produced axes, e.g. ``(N, H)`` or ``(D,)``.
    names: logical axis names of the kernel, ``in_shape + out_shape`` long.
    std: the std of the normal init of the kernel.
    use_bias: whether to add a bias (zeros at init) of ``out_shape``.
    dtype: the compute dtype operands are cast to.
    rngs: the random streams; ``rngs.params()`` draws the kernel.
    out_dtype: the dtype of the result (default ``dtype``).
    cpu_matmul: ``config.model.cpu_matmul``, how the product runs on CPU.
  """

  # The kernel's produced axes once ``flatten_kernel`` made it 2-D (else None).
  flat_out_shape: tuple[int, ...] | None = None

  def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
               names: tuple[str, ...], *, std: float, use_bias: bool,
               dtype: jnp.dtype, rngs: nnx.Rngs,
               out_dtype: jnp.dtype | None = None, cpu_matmul: str = 'xla'):
    self.kernel = normal(rngs, in_shape + out_shape, std, names)
    # Assign once: flax 0.12 makes an attribute first set to None static and
    # then refuses an array in it.
    self.bias = param(jnp.zeros(out_shape, jnp.float32),
                       bias_names(names[len(in_shape):])) if use_bias else None
    self.num_in_axes = len(in_shape)
    self.dtype = dtype
    self.out_dtype = out_dtype or dtype
    self.cpu_matmul = cpu_matmul

  def __call__(self, x: jax.Array) -> jax.Array:
    """Contracts the last ``num_in_axes`` axes of ``x`` with the kernel."""
    kernel = self.kernel[...].astype(self.dtype)
    out_shape = self.flat_out_shape or kernel.shape[self.num_in_axes:]
    lead_shape = x.shape[:x.ndim - self.num_in_axes]
    in_size = math.prod(x.shape[x.ndim - self.num_in_axes:])
    # A float32 result, rounded once after the bias: on XLA:CPU a bf16 x bf16
    # -> f32 dot then a cast made the step ~5% faster than a bf16 result.
    y = cpu_matmul.matmul(x.reshape(-1, in_size), kernel.reshape(in_size, -1),
                          backend=self.cpu_matmul,
                          preferred_element_type=jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].reshape(-1)
    return y.astype(self.out_dtype).reshape(lead_shape + tuple(out_shape))

  def flatten_kernel(self) -> None:
    """Holds the kernel as the 2-D ``[in, out]`` matrix its product runs on.

    For a loop that applies the layer many times to one row (the KV-cache
    decode loop): the reshape then happens once, before the loop. Inside the
    loop, XLA:CPU fuses the reshape of a 3-D kernel into a one-row product
    and emits a naive dot: 4-8x slower per projection in the serving
    TensorFlow (docs/performance.md#decode-at-batch-1-the-savedmodel-against-jax).
    Same arithmetic; the module keeps its names and call signature.
    """
    kernel = self.kernel[...]
    if kernel.ndim > 2:
      self.flat_out_shape = tuple(kernel.shape[self.num_in_axes:])
      self.kernel.value = kernel.reshape(math.prod(kernel.shape[:self.num_in_axes]), -1)


class Embed(nnx.Module):
  """A lookup table ``[rows, D]``; also the LM head when embeddings are tied."""

  def __init__(self, num_rows: int, cfg: 'ModelConfig',
               names: tuple[str | None, str], *, rngs: nnx.Rngs):
    self.table = normal(rngs, (num_rows, cfg.d_model), cfg.init_std, names)
    self.dtype = cfg.compute_dtype
    self.cpu_matmul = cfg.cpu_matmul

  def __call__(self, ids_BT: jax.Array) -> jax.Array:
    """Returns the rows ``ids_BT`` picks, ``[B, T, D]`` in the compute dtype."""
    return jnp.take(self.table[...], ids_BT, axis=0).astype(self.dtype)

  def attend(self, x_BTD: jax.Array) -> jax.Array:
    """Scores ``x_BTD`` against every row: the tied LM head, ``[B, T, V]``."""
    B, T, D = x_BTD.shape
    table_VD = self.table[...].astype(self.dtype)
    # Float32 straight out of the matmul, as for the untied head.
    logits_MV = cpu_matmul.matmul(x_BTD.reshape(B * T, D), table_VD,
                                  backend=self.cpu_matmul, transpose_w=True,
                                  preferred_element_type=jnp.float32)
    return logits_MV.reshape(B, T, -1)


class Norm(nnx.Module):
  """RMSNorm (scale only) or LayerNorm (scale and bias), computed in float32."""

  def __init__(self, cfg: 'ModelConfig'):
    self.scale = param(jnp.ones((cfg.d_model,), jnp.float32), ('norm',))
    self.bias = (param(jnp.zeros((cfg.d_model,), jnp.float32), ('norm',))
                 if cfg.norm == 'layernorm' else None)
    self.eps = cfg.norm_eps
    self.dtype = cfg.compute_dtype

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    x_BTD = x_BTD.astype(jnp.float32)
    if self.bias is not None:
      x_BTD = x_BTD - jnp.mean(x_BTD, axis=-1, keepdims=True)
    # For LayerNorm the mean is already out, so this is the variance.
    ms_BT1 = jnp.mean(jnp.square(x_BTD), axis=-1, keepdims=True)
    y_BTD = x_BTD * jax.lax.rsqrt(ms_BT1 + self.eps) * self.scale[...]
    if self.bias is not None:
      y_BTD = y_BTD + self.bias[...]
    return y_BTD.astype(self.dtype)
