"""LoRA: low-rank adapters on chosen dense kernels, the base weights frozen.

A target ``Dense`` (``config.lora.targets``) becomes a ``LoraDense``: the
same ``kernel`` and ``bias`` plus ``lora_a`` ``[in..., r]`` (normal init) and
``lora_b`` ``[r, out...]`` (zeros, so training starts from the base model
exactly) and computes ``dense(x) + (alpha / r) * (x @ A) @ B``. The
parameter tree keeps every base path and adds ``.../lora_a``, ``.../lora_b``.

``optimizer`` wraps the run's optimizer so that only adapter leaves are
updated and only they have optimizer state (``optax.multi_transform`` with
``set_to_zero`` on the rest: the Adam moments of the base do not exist).
``merge`` folds ``W + (alpha / r) A B`` into the kernels and drops the
adapters: a plain parameter tree for evaluation, export and ``init_from``.
"""

import fnmatch
import math

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from llm_jax.model import layers
from llm_jax.model import transformer as model_lib
from llm_jax.core.errors import UserError

ADAPTER_KEYS = ('lora_a', 'lora_b')


def enabled(config) -> bool:
  """Whether ``config`` asks for adapters (configs older than LoRA do not)."""
  return 'lora' in config and config.lora.rank > 0


def scale(lora_cfg) -> float:
  return float(lora_cfg.alpha) / int(lora_cfg.rank)


class LoraDense(layers.Dense):
  """A ``Dense`` plus a trainable low-rank update; see the module docstring."""

  def __init__(self, base: layers.Dense, *, rank: int, alpha: float,
               rngs: nnx.Rngs):  # pylint: disable=super-init-not-called
    # Not Dense.__init__: the base's own kernel and bias are kept as they are.
    self.kernel, self.bias = base.kernel, base.bias
    self.num_in_axes, self.dtype, self.out_dtype, self.cpu_matmul = (
        base.num_in_axes, base.dtype, base.out_dtype, base.cpu_matmul)
    shape = base.kernel.shape
    in_shape, out_shape = shape[:base.num_in_axes], shape[base.num_in_axes:]
    names = tuple(base.kernel.get_metadata().get('out_sharding') or
                  (None,) * len(shape))
    in_names, out_names = names[:base.num_in_axes], names[base.num_in_axes:]
    # A's init as in the LoRA paper (B = 0 makes the start exact).
    self.lora_a = layers.normal(
        rngs, in_shape + (rank,), 1 / math.sqrt(math.prod(in_shape)),
        in_names + (None,))
    self.lora_b = layers.param(
        jnp.zeros((rank,) + out_shape, jnp.float32), (None,) + out_names)
    self.lora_scale = alpha / rank

  def __call__(self, x: jax.Array) -> jax.Array:
    y = super().__call__(x)
    a = self.lora_a[...].astype(self.dtype)
    b = self.lora_b[...].astype(self.dtype)
    rank = a.shape[-1]
    in_size = math.prod(a.shape[:-1])
    x_MI = x.reshape(-1, in_size)
    h_MR = jnp.dot(x_MI, a.reshape(in_size, rank), preferred_element_type=jnp.float32)
    d_MO = jnp.dot(h_MR.astype(self.dtype), b.reshape(rank, -1),
                   preferred_element_type=jnp.float32) * self.lora_scale
    return (y.astype(jnp.float32) + d_MO.reshape(y.shape)).astype(y.dtype)


def _dense_layers(module, prefix=''):
  """(path, parent, attribute) of every Dense below ``module``."""
  for name, value in list(vars(module).items()):
    if name.startswith('_'):
      continue
    if isinstance(value, layers.Dense):
      yield f'{prefix}{name}', module, name
    elif isinstance(value, nnx.List):
      for i, child in enumerate(value):
        yield from _dense_layers(child, f'{prefix}{name}/{i}/')
    elif isinstance(value, nnx.Module):
      yield from _dense_layers(value, f'{prefix}{name}/')


def _matches(path: str, patterns: list[str]) -> bool:
  return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, '*/' + p)
             for p in patterns)


def apply(model: model_lib.Transformer, lora_cfg, seed: int) -> model_lib.Transformer:
  """Replaces the target Dense layers of ``model`` by ``LoraDense`` (in place)."""
  rank = int(lora_cfg.rank)
  patterns = [p.strip() for p in lora_cfg.targets.split(',') if p.strip()]
  rngs = nnx.Rngs(seed + 1)  # Adapters draw apart from the base init.
  layers = list(_dense_layers(model))
  chosen = [(path, parent, attr) for path, parent, attr in layers
            if _matches(path, patterns)]
  if not chosen:
    raise UserError(f'lora.targets={lora_cfg.targets!r} matches no dense layer; '
                    f'they are named like {", ".join(p for p, _, _ in layers[:7])}.')
  for _, parent, attr in chosen:
    setattr(parent, attr, LoraDense(getattr(parent, attr), rank=rank,
                                    alpha=float(lora_cfg.alpha), rngs=rngs))
  return model


def is_adapter_path(path) -> bool:
  return any(getattr(k, 'key', None) in ADAPTER_KEYS for k in path)


def optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` on adapter leaves only; the rest get zero updates and no state."""
  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: 'adapter' if is_adapter_path(path) else 'frozen', params)
  return optax.multi_transform({'adapter': tx, 'frozen': optax.set_to_zero()}, labels)


def merge(params: dict, lora_cfg) -> dict:
  """Folds every adapter into its kernel; the tree of the plain model."""
  s = scale(lora_cfg)

  def walk(tree):
    if not isinstance(tree, dict):
      return tree
    if 'lora_a' in tree:
      a, b, kernel = tree['lora_a'], tree['lora_b'], tree['kernel']
      rank = a.shape[-1]
      delta = jnp.dot(jnp.reshape(a, (-1, rank)), jnp.reshape(b, (rank, -1)),
                      precision=jax.lax.Precision.HIGHEST)
      out = {k: v for k, v in tree.items() if k not in ADAPTER_KEYS}
      out['kernel'] = kernel + s * delta.reshape(kernel.shape)
      return out
    return {k: walk(v) for k, v in tree.items()}

  return walk(params)


def opt_state_shardings(abstract_opt_state, params_shardings, mesh):
  """Adapter moments shard like their adapters; everything else replicated.

  ``sharding.opt_state_shardings`` maps whole params-shaped trees, which the
  masked state of ``optimizer`` is not (frozen leaves are ``MaskedNode``s);
  here each state leaf is matched to the parameter whose path ends its own.
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  by_path = {jax.tree_util.keystr(p): s for p, s in
             jax.tree_util.tree_flatten_with_path(params_shardings)[0]}

  def pick(path, leaf):
    key = jax.tree_util.keystr(path)
    del leaf
    for param_path, s in by_path.items():
      if key.endswith(param_path):
        return s
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def freeze_base(params):
  """``params`` with every non-adapter leaf behind ``stop_gradient``.

  A no-op for a tree without adapters. With them, the backward pass never
  computes gradients of the frozen weights (they would be thrown away by
  ``optimizer`` anyway): less compute and no weight-sized gradient buffers.
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  if not any(is_adapter_path(p) for p, _ in leaves):
    return params
  return jax.tree_util.tree_map_with_path(
      lambda p, v: v if is_adapter_path(p) else jax.lax.stop_gradient(v), params)


def adapters_off(params):
  """``params`` with every ``lora_b`` zero: the base model, exactly (a no-op without adapters).

  A LoRA run's reference model (DPO, GRPO) is its own base: the adapter
  update ``(x @ A) @ B`` is then exactly 0, and no second copy is held.
  """
  return jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.zeros_like(v) if getattr(p[-1], 'key', None) == 'lora_b' else v,
      params)
