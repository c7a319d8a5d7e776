"""The Optax chain from config: AdamW, warmup + cosine schedule, clipping, decay mask.

Gradient accumulation is not here: ``trainer.train_step`` sums micro-batch
gradients itself, so one call of the step is always one optimizer update and
``state.step`` counts updates.
"""

import jax
import optax

from llm_jax.errors import UserError


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
  """Decay matrices (kernels, embeddings); never norms or biases (1-D)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW with global-norm clipping, as configured in ``config.optim``."""
  adamw = optax.adamw(
      learning_rate_schedule(optim_cfg, total_steps),
      b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
      weight_decay=optim_cfg.weight_decay, mask=weight_decay_mask)
  if optim_cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), adamw)
  return adamw
