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
  # The frozen reference of DPO and GRPO (their starting parameters, sharded
  # like params), or None: other objectives, and LoRA runs, whose reference
  # is the base itself (adapters off, ``reference_params``).
  ref_params: Any = None


def reference_params(params, ref_params):
  """The reference model's parameters, outside the gradient.

  A frozen copy when the state holds one; else ``params`` with every LoRA
  adapter switched off (``lora_b`` zero): the base model, at no memory cost.
  """
  return jax.lax.stop_gradient(lora.adapters_off(params) if ref_params is None
                               else ref_params)


def _loss_fn(params, ref_params, batch, graphdef, objective):
  # With LoRA adapters, no gradient flows to the frozen weights.
  model = nnx.merge(graphdef, lora.freeze_base(params))
  ref_model = (nnx.merge(graphdef, reference_params(params, ref_params))
               if objective.needs_reference else None)
  return objective.loss(model, ref_model, batch)


def train_step(state: TrainState, batch: Batch, *, graphdef, tx, schedule,
               accum_steps: int, loss_chunk: int = 0,
               objective=None, fused_update=None) -> tuple[TrainState, dict]:
  """One optimizer update on a global batch, accumulating micro-batch grads.

  ``objective`` (``llm_jax/training/objectives.py``, chosen by
  ``config.objective``) gives the loss and its metrics; None is the token
  cross-entropy with ``loss_chunk``. ``fused_update``
  (``fused_adamw.make_update``) replaces ``tx.update`` with the same update in
  one call per parameter on CPU.
  """
  # The batch contract at the step's door: every key [B, T] (checked at trace time).
  chex.assert_rank(batch['inputs'], 2)
  chex.assert_equal_shape(list(batch.values()))
  objective = objective or objectives.LanguageModel(loss_chunk=loss_chunk)
  grad_fn = jax.value_and_grad(
      functools.partial(_loss_fn, graphdef=graphdef, objective=objective), has_aux=True)
  if accum_steps == 1:
    (loss, extra), grads = grad_fn(state.params, state.ref_params, batch)
  else:
    # Micro-batch i takes rows i, i+A, i+2A, ...: every device keeps its own
    # rows, so no data moves between devices to form the micro-batches.
    micro = jax.tree.map(
        lambda x: x.reshape(-1, accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

    def accumulate(grads_sum, mb):
      (loss_mb, extra_mb), g = grad_fn(state.params, state.ref_params, mb)
      return jax.tree.map(jnp.add, grads_sum, g), (loss_mb, extra_mb)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, (losses, extras) = jax.lax.scan(accumulate, zeros, micro)
    # Equal-sized micro-batches: the mean of their means is the batch mean
    # (with loss weights, as in SFT, it weights each micro-batch equally).
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    loss, extra = losses.mean(), jax.tree.map(jnp.mean, extras)
  # With weights (masked LM) micro-batches hold about, not exactly, the same
  # weight, so the mean of their means is the batch mean only to that extent.
  grad_norm = optax.tree.norm(grads)
  # A non-finite loss or gradient never reaches the weights or the Adam
  # moments; train.nan_policy decides on the host whether to stop or go on.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if fused_update is not None:  # One call per parameter on CPU (fused_adamw.py).
    params, opt_state = fused_update(tx, grads, state.opt_state, state.params,
                                     grad_norm, finite)
  else:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    keep_if_finite = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    params = keep_if_finite(optax.apply_updates(state.params, updates), state.params)
    opt_state = keep_if_finite(opt_state, state.opt_state)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, {'loss': loss, 'grad_norm': grad_norm,
                     'lr': schedule(state.step), 'finite': finite, **extra}


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


def pair_eval_step(params, ref_params, batch: Batch, *, graphdef, objective) -> dict:
  """Sums of a preference objective over the real pairs of ``batch``.

  ``count`` pairs, ``loss_sum``, ``correct`` (chosen reward above rejected),
  ``margin_sum``, ``chosen_sum``, ``rejected_sum`` (and ORPO's NLL sums).
  """
  model = nnx.merge(graphdef, params)
  ref_model = (nnx.merge(graphdef, reference_params(params, ref_params))
               if objective.needs_reference else None)
  return objective.evaluate(model, ref_model, batch)
