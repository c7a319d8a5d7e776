"""The Optax chain from config: AdamW, warmup + cosine schedule, clipping, decay mask.

Gradient accumulation is not here: ``steps.train_step`` sums micro-batch
gradients itself, so one call of the step is always one optimizer update and
``state.step`` counts updates.
"""

import jax
import jax.numpy as jnp
import optax

from llm_jax.core.errors import UserError

STATE_DTYPES = ('float32', 'bfloat16')  # For optim.state_dtype.


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to peak * min_lr_ratio."""
  peak = float(optim_cfg.learning_rate)
  warmup = int(optim_cfg.warmup_steps)
  if peak <= 0:
    raise UserError(f'optim.learning_rate must be positive (got {peak}).')
  if not 0 <= warmup < total_steps:
    raise UserError(
        f'optim.warmup_steps={warmup} must be at least 0 and below '
        f'train.steps={total_steps}.')
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=total_steps, end_value=peak * float(optim_cfg.min_lr_ratio))
  # Update k (counting from 0) uses the rate at k + 1: the first update is not
  # wasted at rate 0, and the last one lands on the final rate.
  return lambda count: schedule(count + 1)


def weight_decay_mask(params):
  """Decay matrices (kernels, embeddings); never norms or biases (1-D).

  Scanned blocks (``model.scan_layers``) carry a leading layers axis, which
  does not count: a stacked norm scale ``[L, D]`` is still a vector.
  """
  blocks = params.get('blocks') if isinstance(params, dict) else None
  stacked = isinstance(blocks, dict) and not all(isinstance(k, int) for k in blocks)

  def decay(path, p):
    layers_axis = stacked and getattr(path[0], 'key', None) == 'blocks'
    return p.ndim - int(layers_axis) >= 2

  return jax.tree_util.tree_map_with_path(decay, params)


def _is_float(x) -> bool:
  # Not every leaf is an array: optax.tree_map_params inits on placeholders.
  return hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating)


def with_state_dtype(tx: optax.GradientTransformation,
                     dtype) -> optax.GradientTransformation:
  """Keeps ``tx``'s floating-point state (Adam's moments) in ``dtype``.

  The update itself runs in float32: the stored state is cast up on the way
  in and rounded on the way out, so only memory changes (half for bfloat16).
  """
  dtype = jnp.dtype(dtype)

  def cast(tree, to):
    return jax.tree.map(
        lambda x: x.astype(to) if _is_float(x) else x, tree)

  def init(params):
    return cast(tx.init(params), dtype)

  def update(updates, state, params=None):
    updates, state = tx.update(updates, cast(state, jnp.float32), params)
    return updates, cast(state, dtype)

  return optax.GradientTransformation(init, update)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW with global-norm clipping, as configured in ``config.optim``."""
  if optim_cfg.state_dtype not in STATE_DTYPES:
    raise UserError(f'optim.state_dtype={optim_cfg.state_dtype!r} is not one of '
                    f'{", ".join(map(repr, STATE_DTYPES))}; pick one of them.')
  adamw = optax.adamw(
      learning_rate_schedule(optim_cfg, total_steps),
      b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
      weight_decay=optim_cfg.weight_decay, mask=weight_decay_mask)
  if optim_cfg.state_dtype != 'float32':
    adamw = with_state_dtype(adamw, optim_cfg.state_dtype)
  if optim_cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), adamw)
  return adamw
