"""The pure train and eval steps over the batch contract (``llm_jax/data/batch.py``).

``train_step(state, batch) -> (state, metrics)`` is the only place gradients are
taken. It is a pure function over pytrees: the model's graph definition is
static and its parameters are a plain dict, so one jitted function serves one
CPU, a device mesh and export.
"""

import functools
from typing import Any

import chex
from flax import nnx, struct
import jax
import jax.numpy as jnp
import optax

from llm_jax.data.batch import Batch
from llm_jax.model import lora
from llm_jax.training import objectives


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates done so far.
  params: Any  # Pure dict of float32 arrays (the model's nnx.Param values).
  opt_state: Any  # Optax state; moments shaped and sharded like params.
  rng: jax.Array  # PRNG key data, for anything stochastic in training.


def _loss_fn(params, batch, graphdef, loss_chunk: int = 0):
  # With LoRA adapters, no gradient flows to the frozen weights.
  model = nnx.merge(graphdef, lora.freeze_base(params))
  loss_sum, count, _ = objectives.model_loss(model, batch, loss_chunk=loss_chunk)
  # A micro-batch of only prompt tokens has loss 0 (its sum), not NaN.
  return loss_sum / jnp.where(count > 0, count, 1.0), loss_sum


def train_step(state: TrainState, batch: Batch, *, graphdef, tx, schedule,
               accum_steps: int, loss_chunk: int = 0) -> tuple[TrainState, dict]:
  """One optimizer update on a global batch, accumulating micro-batch grads."""
  # The batch contract at the step's door: every key [B, T] (checked at trace time).
  chex.assert_rank(batch['inputs'], 2)
  chex.assert_equal_shape(list(batch.values()))
  grad_fn = jax.value_and_grad(
      functools.partial(_loss_fn, loss_chunk=loss_chunk), has_aux=True)
  if accum_steps == 1:
    (loss, _), grads = grad_fn(state.params, batch, graphdef)
  else:
    # Micro-batch i takes rows i, i+A, i+2A, ...: every device keeps its own
    # rows, so no data moves between devices to form the micro-batches.
    micro = jax.tree.map(
        lambda x: x.reshape(-1, accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

    def accumulate(grads_sum, mb):
      (loss_mb, _), g = grad_fn(state.params, mb, graphdef)
      return jax.tree.map(jnp.add, grads_sum, g), loss_mb

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, losses = jax.lax.scan(accumulate, zeros, micro)
    # Equal-sized micro-batches: the mean of their means is the batch mean
    # (with loss weights, as in SFT, it weights each micro-batch equally).
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    loss = losses.mean()
  # With weights (masked LM) micro-batches hold about, not exactly, the same
  # weight, so the mean of their means is the batch mean only to that extent.
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  # A non-finite loss or gradient never reaches the weights or the Adam
  # moments; train.nan_policy decides on the host whether to stop or go on.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep_if_finite = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
      step=state.step + 1, params=keep_if_finite(params, state.params),
      opt_state=keep_if_finite(opt_state, state.opt_state))
  return new_state, {'loss': loss, 'grad_norm': grad_norm,
                     'lr': schedule(state.step), 'finite': finite}


def eval_step(params, batch: Batch, *, graphdef, loss_chunk: int = 0) -> dict:
  """Summed validation loss, weight (token or row count) and correct argmaxes.

  With ``loss_chunk`` a decoder's logits are never whole, so no argmaxes are
  counted (``correct`` is 0; only encoders report accuracy: masked tokens,
  classes, or answer spans whose start and end are both right).
  """
  model = nnx.merge(graphdef, params)
  loss_sum, count, outputs = objectives.model_loss(
      model, batch, loss_chunk=loss_chunk, need_logits=not model.cfg.causal)
  if outputs is None:
    return {'loss_sum': loss_sum, 'count': count, 'correct': jnp.zeros((), jnp.float32)}
  return {'loss_sum': loss_sum, 'count': count,
          'correct': objectives.correct(outputs, batch)}
