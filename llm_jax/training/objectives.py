"""The training objectives, as losses over the batch contract (``llm_jax/data/batch.py``).

``token_cross_entropy`` is the language models' objective: next-token
prediction (decoders), masked-token prediction (encoders) and response-only
SFT differ only in the batch's ``targets`` and ``weights``. It returns a
weighted sum and the total weight; the loss is their ratio.
``classification_cross_entropy`` and ``span_cross_entropy`` are an encoder's
task heads' (``model.head``); ``model_loss`` picks the model's, and
``correct`` counts what its accuracy counts.

A cross-entropy that never holds the full float32 ``[B, T, V]`` logits:

``chunked_cross_entropy`` applies the LM head to ``chunk`` positions at a time
inside a ``lax.scan``; each chunk's body is rematerialised, so the backward
pass recomputes that chunk's logits instead of keeping them. Peak memory for
the loss drops from ``B * T * V`` floats (plus their gradient) to about
``B * chunk * V``: with a 128k vocabulary, sequence 2048 and batch 8 that is
8 GiB of logits against 1 GiB at chunk 256 (docs/performance.md).

Letters as in ``llm_jax/model/transformer.py``; C is the chunk length.
"""

import jax
import jax.numpy as jnp
import optax

from llm_jax.core.errors import UserError
from llm_jax.data.batch import Batch


def token_cross_entropy(model, batch: Batch, *, loss_chunk: int = 0,
                        need_logits: bool = False):
  """``(weighted loss sum, total weight, logits or None)`` of ``model`` on ``batch``.

  Args:
    model: the Transformer (or a LoRA-wrapped one).
    batch: the batch contract; ``positions`` and ``segment_ids`` (packed
      rows) and ``weights`` are optional.
    loss_chunk: ``train.loss_chunk``: apply the LM head this many positions
      at a time (``chunked_cross_entropy``); 0 computes whole logits.
    need_logits: the caller needs the ``[B, T, V]`` logits (e.g. an
      encoder's masked-token accuracy): chunking is then skipped.
  """
  inputs = dict(tokens_BT=batch['inputs'], positions_BT=batch.get('positions'),
                segment_ids_BT=batch.get('segment_ids'))
  if 'token_type_ids' in batch:
    inputs['token_types_BT'] = batch['token_type_ids']
  if loss_chunk and not need_logits:
    loss_sum, count = chunked_cross_entropy(
        model(**inputs, return_hidden=True), model.lm_head_DV(),
        batch['targets'], batch.get('weights'), chunk=loss_chunk,
        bias_V=model.lm_head_bias_V())
    return loss_sum, count, None
  logits_BTV = model(**inputs)
  loss_sum, count = cross_entropy(logits_BTV, batch['targets'], batch.get('weights'))
  return loss_sum, count, logits_BTV


def model_loss(model, batch: Batch, *, loss_chunk: int = 0, need_logits: bool = False):
  """``(weighted loss sum, total weight, outputs or None)`` of the model's own objective."""
  head = model.cfg.head
  if head == 'classification':
    return classification_cross_entropy(model, batch)
  if head == 'qa':
    return span_cross_entropy(model, batch)
  return token_cross_entropy(model, batch, loss_chunk=loss_chunk, need_logits=need_logits)


def _task_inputs(batch: Batch) -> dict:
  return dict(tokens_BT=batch['inputs'], segment_ids_BT=batch.get('segment_ids'),
              token_types_BT=batch.get('token_type_ids'))


def _row_weights(batch: Batch) -> jax.Array:
  """A row's weight (column 0: per-row values are repeated along T)."""
  if 'weights' in batch:
    return batch['weights'][:, 0].astype(jnp.float32)
  return jnp.ones(batch['inputs'].shape[:1], jnp.float32)


def classification_cross_entropy(model, batch: Batch):
  """Cross-entropy of the class logits ``[B, C]`` against ``labels``."""
  logits_BC = model(**_task_inputs(batch))
  losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, batch['labels'][:, 0])
  w_B = _row_weights(batch)
  return (losses_B * w_B).sum(), w_B.sum(), logits_BC


def span_cross_entropy(model, batch: Batch):
  """Mean of the start and end tokens' cross-entropies (padding never wins).

  Returns the start/end logits ``[B, T, 2]`` as outputs, padding at -1e9.
  """
  out_BT2 = model(**_task_inputs(batch))
  if 'segment_ids' in batch:
    out_BT2 = jnp.where(batch['segment_ids'][..., None] > 0, out_BT2, -1e9)
  ce = optax.softmax_cross_entropy_with_integer_labels
  losses_B = 0.5 * (ce(out_BT2[..., 0], batch['start_positions'][:, 0]) +
                    ce(out_BT2[..., 1], batch['end_positions'][:, 0]))
  w_B = _row_weights(batch)
  return (losses_B * w_B).sum(), w_B.sum(), out_BT2


def correct(outputs, batch: Batch) -> jax.Array:
  """Weighted count of right answers: argmax tokens, classes or both span ends."""
  if 'labels' in batch:
    hits = jnp.argmax(outputs, axis=-1) == batch['labels'][:, 0]
    return (hits * _row_weights(batch)).sum()
  if 'start_positions' in batch:
    best_B2 = jnp.argmax(outputs, axis=1)
    hits = ((best_B2[:, 0] == batch['start_positions'][:, 0]) &
            (best_B2[:, 1] == batch['end_positions'][:, 0]))
    return (hits * _row_weights(batch)).sum()
  hits_BT = (jnp.argmax(outputs, axis=-1) == batch['targets']).astype(jnp.float32)
  if 'weights' in batch:
    hits_BT = hits_BT * batch['weights']
  return hits_BT.sum()


def chunked_cross_entropy(hidden_BTD: jax.Array, head_DV: jax.Array,
                          targets_BT: jax.Array,
                          weights_BT: jax.Array | None = None, *,
                          chunk: int, bias_V: jax.Array | None = None
                          ) -> tuple[jax.Array, jax.Array]:
  """Weighted summed token cross-entropy, computed ``chunk`` positions at a time.

  Args:
    hidden_BTD: the final-normed hidden states (``Transformer(...,
      return_hidden=True)``), in the compute dtype.
    head_DV: the LM head (``Transformer.lm_head_DV()``).
    targets_BT: int target ids.
    weights_BT: float loss weight per target (the batch contract's
      ``weights``); None means all ones.
    chunk: positions per chunk; must divide T.
    bias_V: an output bias (BERT's masked-LM head), or None.

  Returns:
    ``(weighted_sum, weight_total)`` as float32 scalars, as
    ``cross_entropy`` returns them: the loss is their ratio.

  Raises:
    UserError: ``chunk`` does not divide the sequence length.
  """
  B, T, D = hidden_BTD.shape
  if chunk <= 0 or T % chunk:
    raise UserError(f'train.loss_chunk={chunk} must divide the sequence length '
                    f'{T} (data.seq_len); pick a divisor such as '
                    f'{_divisor_near(T, chunk)}, or 0 to turn chunking off.')
  if weights_BT is None:
    weights_BT = jnp.ones((B, T), jnp.float32)
  n = T // chunk
  # Chunks lead, for lax.scan: [n, B, C, ...].
  to_chunks = lambda x: x.reshape(B, n, chunk, *x.shape[2:]).swapaxes(0, 1)
  xs = (to_chunks(hidden_BTD), to_chunks(targets_BT),
        to_chunks(weights_BT.astype(jnp.float32)))

  # nothing_saveable: only the chunk's inputs survive to the backward pass;
  # its [B*C, V] logits are recomputed there, one chunk at a time.
  @jax.checkpoint
  def chunk_loss(x_BCD, t_BC, w_BC):
    logits_MV = jnp.dot(x_BCD.reshape(B * chunk, D), head_DV,
                        preferred_element_type=jnp.float32)
    if bias_V is not None:
      logits_MV = logits_MV + bias_V
    lse_M = jax.nn.logsumexp(logits_MV, axis=-1)
    picked_M = jnp.take_along_axis(logits_MV, t_BC.reshape(-1, 1), axis=-1)[:, 0]
    return jnp.sum((lse_M - picked_M) * w_BC.reshape(-1))

  def body(total, inputs):
    return total + chunk_loss(*inputs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
  return total, jnp.sum(weights_BT.astype(jnp.float32))


def _divisor_near(T: int, chunk: int) -> int:
  """The divisor of ``T`` closest to ``chunk`` (for the error message)."""
  return min((d for d in range(1, T + 1) if T % d == 0),
             key=lambda d: abs(d - max(chunk, 1)))


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array,
                  weights_BT: jax.Array | None = None):
  """Weighted summed token cross-entropy (float32) and the total weight.

  ``weights_BT`` (float32, one per target; None means all ones, and the total
  is the token count) lets SFT count only response tokens and the masked-LM
  objective only selected positions; the loss is their ratio.
  """
  losses_BT = optax.softmax_cross_entropy_with_integer_labels(
      logits_BTV.astype(jnp.float32), targets_BT)
  if weights_BT is None:
    return losses_BT.sum(), jnp.asarray(losses_BT.size, jnp.float32)
  weights_BT = weights_BT.astype(jnp.float32)
  return (losses_BT * weights_BT).sum(), weights_BT.sum()
