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

Alignment objectives (docs/alignment.md) are losses over the same contract:
``RewardModel`` (Bradley-Terry on a scalar head), ``Dpo`` (sigmoid with
label smoothing, or IPO) and ``Orpo`` on preference pairs, ``Grpo`` on
rollouts. Each is a frozen dataclass with ``loss(model, ref_model, batch) ->
(loss, metrics)``; ``from_config`` picks one by ``config.objective`` and
``llm_jax/training/steps.py`` takes the gradient of whichever it is.

Letters as in ``llm_jax/model/transformer.py``; C is the chunk length.
"""

import dataclasses
import math

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


# ---- Per-token log-probabilities (preference and RL objectives).


def token_logps(model, inputs_BT: jax.Array, targets_BT: jax.Array, *,
                loss_chunk: int = 0, temperature: float = 1.0) -> jax.Array:
  """float32 ``log p(target | prefix)`` at every position, ``[B, T]``.

  Rows are unpacked and right-padded (positions 0..T-1). Logits are divided
  by ``temperature`` first (GRPO scores the distribution it sampled from).
  With ``loss_chunk`` the LM head runs that many positions at a time and the
  ``[B, T, V]`` logits never exist (as in ``chunked_cross_entropy``).
  """
  if not loss_chunk:
    logits_BTV = model(inputs_BT).astype(jnp.float32) / temperature
    return -optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
  hidden_BTD, head_DV = model(inputs_BT, return_hidden=True), model.lm_head_DV()
  B, T, D = hidden_BTD.shape
  if T % loss_chunk:
    raise UserError(f'train.loss_chunk={loss_chunk} must divide the sequence length '
                    f'{T} (data.seq_len); pick a divisor such as '
                    f'{_divisor_near(T, loss_chunk)}, or 0 to turn chunking off.')
  n = T // loss_chunk
  to_chunks = lambda x: x.reshape(B, n, loss_chunk, *x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def chunk_logps(x_BCD, t_BC):
    logits_MV = jnp.dot(x_BCD.reshape(B * loss_chunk, D), head_DV,
                        preferred_element_type=jnp.float32) / temperature
    return -optax.softmax_cross_entropy_with_integer_labels(
        logits_MV, t_BC.reshape(-1)).reshape(B, loss_chunk)

  _, logps_nBC = jax.lax.scan(lambda c, xs: (c, chunk_logps(*xs)), None,
                              (to_chunks(hidden_BTD), to_chunks(targets_BT)))
  return logps_nBC.swapaxes(0, 1).reshape(B, T)


def _both_sides(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Chosen rows then rejected rows, ``[2B, T]``: one forward pass for a pair."""
  cat = lambda key: jnp.concatenate([batch[key], batch['rejected_' + key]])
  return cat('inputs'), cat('targets'), cat('weights').astype(jnp.float32)


def _pair_sums(model, batch: Batch, loss_chunk: int):
  """Summed response log-probs and response token counts: four ``[B]`` arrays."""
  inputs, targets, weights = _both_sides(batch)
  sums_2B = (token_logps(model, inputs, targets, loss_chunk=loss_chunk)
             * weights).sum(axis=1)
  lp_c, lp_r = jnp.split(sums_2B, 2)
  n_c, n_r = jnp.split(weights.sum(axis=1), 2)
  return lp_c, lp_r, n_c, n_r


def last_weighted(weights_BT: jax.Array) -> jax.Array:
  """int32 ``[B]``: each row's last position with weight (its response's end)."""
  T = weights_BT.shape[1]
  return (T - 1 - jnp.argmax(weights_BT[:, ::-1] > 0, axis=1)).astype(jnp.int32)


def _log1mexp(x: jax.Array) -> jax.Array:
  """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-log 2``."""
  return jnp.where(x < -math.log(2), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def _masked_mean(x_B: jax.Array, real_B: jax.Array) -> jax.Array:
  return (x_B * real_B).sum() / jnp.maximum(real_B.sum(), 1.0)


class _PairObjective:
  """Shared by the preference objectives: per-pair terms to means and sums.

  ``terms(model, ref_model, batch)`` returns ``[B]`` arrays: ``loss``, the
  ``chosen`` and ``rejected`` rewards, and optionally ``nll``/``nll_count``
  (ORPO's token-mean NLL over chosen responses). Pairs whose chosen weights
  are all 0 (eval filler) count nothing.
  """
  is_pairwise = True
  needs_reference = False

  def loss(self, model, ref_model, batch: Batch) -> tuple[jax.Array, dict]:
    t = self.terms(model, ref_model, batch)
    real = (batch['weights'].sum(axis=1) > 0).astype(jnp.float32)
    mean = lambda x: _masked_mean(x, real)
    loss = mean(t['loss'])
    out = {'accuracy': mean((t['chosen'] > t['rejected']).astype(jnp.float32)),
           'margin': mean(t['chosen'] - t['rejected']),
           'chosen_reward': mean(t['chosen']), 'rejected_reward': mean(t['rejected'])}
    if 'nll' in t:
      out['nll'] = t['nll'].sum() / jnp.maximum(t['nll_count'].sum(), 1.0)
      loss = loss + out['nll']
    return loss, out

  def evaluate(self, model, ref_model, batch: Batch) -> dict:
    """Sums over the real pairs of ``batch`` (``Trainer.evaluate`` divides)."""
    t = self.terms(model, ref_model, batch)
    real = (batch['weights'].sum(axis=1) > 0).astype(jnp.float32)
    total = lambda x: (x * real).sum()
    out = {'count': real.sum(), 'loss_sum': total(t['loss']),
           'correct': total((t['chosen'] > t['rejected']).astype(jnp.float32)),
           'margin_sum': total(t['chosen'] - t['rejected']),
           'chosen_sum': total(t['chosen']), 'rejected_sum': total(t['rejected'])}
    if 'nll' in t:  # The NLL is a token mean: its sums ride along.
      out.update(nll_sum=total(t['nll']), nll_count=total(t['nll_count']))
    return out


@dataclasses.dataclass(frozen=True)
class LanguageModel:
  """The model's own loss (``model_loss``): token cross-entropy for pre-training,
  masked LM and SFT; an encoder's task head (classification, QA) its own."""
  loss_chunk: int = 0
  is_pairwise = False
  needs_reference = False

  def loss(self, model, ref_model, batch: Batch) -> tuple[jax.Array, dict]:
    del ref_model
    loss_sum, count, _ = model_loss(model, batch, loss_chunk=self.loss_chunk)
    # A micro-batch of only prompt tokens has loss 0 (its sum), not NaN.
    return loss_sum / jnp.where(count > 0, count, 1.0), {}


@dataclasses.dataclass(frozen=True)
class RewardModel(_PairObjective):
  """Bradley-Terry: ``-log sigmoid(r(chosen) - r(rejected))``.

  ``r`` is the scalar head (``llm_jax/model/heads.py``) on the hidden state
  at the response's last token (its last weighted position: the end-of-text
  is the target there, so every response token has been read).
  """

  def terms(self, model, ref_model, batch: Batch) -> dict:
    del ref_model
    inputs, _, weights = _both_sides(batch)
    r_c, r_r = jnp.split(model.score(inputs, last_weighted(weights)), 2)
    return {'loss': -jax.nn.log_sigmoid(r_c - r_r), 'chosen': r_c, 'rejected': r_r}


@dataclasses.dataclass(frozen=True)
class Dpo(_PairObjective):
  """DPO against a frozen reference (Rafailov et al. 2023), or IPO.

  With ``d = (log pi/ref)(chosen) - (log pi/ref)(rejected)`` over response
  tokens: 'sigmoid' is ``-(1-e) log s(beta d) - e log s(-beta d)`` (``e`` =
  ``label_smoothing``, the conservative DPO); 'ipo' is ``(d' - 1/(2 beta))^2``
  with each log-ratio divided by its response's token count, as TRL does.
  Rewards are ``beta * log pi/ref`` of each side.
  """
  beta: float = 0.1
  label_smoothing: float = 0.0
  loss_type: str = 'sigmoid'
  loss_chunk: int = 0
  needs_reference = True

  def terms(self, model, ref_model, batch: Batch) -> dict:
    lp_c, lp_r, n_c, n_r = _pair_sums(model, batch, self.loss_chunk)
    ref_c, ref_r, _, _ = jax.lax.stop_gradient(_pair_sums(ref_model, batch, self.loss_chunk))
    ratio_c, ratio_r = lp_c - ref_c, lp_r - ref_r
    d = ratio_c - ratio_r
    if self.loss_type == 'ipo':
      d_avg = ratio_c / jnp.maximum(n_c, 1.0) - ratio_r / jnp.maximum(n_r, 1.0)
      loss = (d_avg - 1 / (2 * self.beta)) ** 2
    else:
      e = self.label_smoothing
      loss = -(1 - e) * jax.nn.log_sigmoid(self.beta * d) - e * jax.nn.log_sigmoid(-self.beta * d)
    return {'loss': loss, 'chosen': self.beta * jax.lax.stop_gradient(ratio_c),
            'rejected': self.beta * jax.lax.stop_gradient(ratio_r)}


@dataclasses.dataclass(frozen=True)
class LogProbPreference(_PairObjective):
  """Not trained: a policy's own preference, summed response log-probs.

  ``llm_jax.evaluate --preferences`` reports how often the chosen response
  is the likelier one, and by how much, for any decoder run (an SFT start
  and what DPO made of it compare on it; no reference is needed).
  """
  loss_chunk: int = 0

  def terms(self, model, ref_model, batch: Batch) -> dict:
    del ref_model
    lp_c, lp_r, _, _ = _pair_sums(model, batch, self.loss_chunk)
    return {'loss': -jax.nn.log_sigmoid(lp_c - lp_r), 'chosen': lp_c, 'rejected': lp_r}


@dataclasses.dataclass(frozen=True)
class Orpo(_PairObjective):
  """ORPO (Hong et al. 2024): NLL of the chosen response minus ``beta`` log s(log-odds).

  Log-odds are of the mean per-token log-probs ``p``: ``log p_c/(1-p_c) -
  log p_r/(1-p_r)``. No reference model. The NLL is the token mean over the
  chosen responses (TRL's also covers the prompt; the paper's does not).
  Rewards are ``beta`` times the mean log-probs, as TRL logs them.
  """
  beta: float = 0.1
  loss_chunk: int = 0

  def terms(self, model, ref_model, batch: Batch) -> dict:
    del ref_model
    lp_c, lp_r, n_c, n_r = _pair_sums(model, batch, self.loss_chunk)
    avg_c, avg_r = lp_c / jnp.maximum(n_c, 1.0), lp_r / jnp.maximum(n_r, 1.0)
    log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
    return {'loss': -self.beta * jax.nn.log_sigmoid(log_odds), 'nll': -lp_c,
            'nll_count': n_c, 'chosen': self.beta * jax.lax.stop_gradient(avg_c),
            'rejected': self.beta * jax.lax.stop_gradient(avg_r)}


@dataclasses.dataclass(frozen=True)
class Grpo:
  """GRPO's clipped surrogate with a k3 KL to the reference (Shao et al. 2024).

  Per completion token: ``-min(r A, clip(r, 1-eps, 1+eps) A) + beta k3`` with
  ``r = pi / pi_old`` and ``k3 = exp(q) - q - 1``, ``q = log ref - log pi``;
  averaged over every completion token of the batch. ``pi_old`` is the
  rollout policy, recomputed here: one optimizer update per rollout makes it
  the current parameters (``r = 1``, whose gradient is the policy gradient;
  the clip acts only when they differ). ``beta = 0`` needs no reference.
  """
  epsilon: float = 0.2
  beta: float = 0.04
  temperature: float = 1.0
  loss_chunk: int = 0
  is_pairwise = False

  @property
  def needs_reference(self) -> bool:
    return self.beta > 0

  def loss(self, model, ref_model, batch: Batch) -> tuple[jax.Array, dict]:
    w = batch['weights'].astype(jnp.float32)
    adv = batch['advantages']
    kw = dict(loss_chunk=self.loss_chunk, temperature=self.temperature)
    logp = token_logps(model, batch['inputs'], batch['targets'], **kw)
    ratio = jnp.exp(logp - jax.lax.stop_gradient(logp))
    clipped = jnp.clip(ratio, 1 - self.epsilon, 1 + self.epsilon)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    tokens = jnp.maximum(w.sum(), 1.0)
    kl = jnp.zeros(())
    if self.needs_reference:
      q = jax.lax.stop_gradient(token_logps(ref_model, batch['inputs'], batch['targets'],
                                            **kw)) - logp
      k3 = jnp.exp(q) - q - 1
      per_token = per_token + self.beta * k3
      kl = (jax.lax.stop_gradient(k3) * w).sum() / tokens
    was_clipped = ((ratio < 1 - self.epsilon) & (adv < 0)) | ((ratio > 1 + self.epsilon) & (adv > 0))
    return (per_token * w).sum() / tokens, {
        'reward': batch['rewards'][:, 0].mean(), 'kl': kl,
        'completion_length': w.sum(axis=1).mean(),
        'clip_fraction': (was_clipped * w).sum() / tokens}


OBJECTIVES = ('lm', 'reward', 'dpo', 'orpo', 'grpo')
DPO_LOSSES = ('sigmoid', 'ipo')


def objective_of(config) -> str:
  """``config.objective``; 'lm' for a config.json written before objectives."""
  return config.objective if 'objective' in config else 'lm'


def from_config(config):
  """The objective ``config.objective`` names, with its settings."""
  name, chunk = objective_of(config), config.train.loss_chunk
  if name not in OBJECTIVES:
    raise UserError(f'objective={name!r} is not one of {", ".join(map(repr, OBJECTIVES))}.')
  if name == 'lm':
    return LanguageModel(loss_chunk=chunk)
  if name == 'reward':
    return RewardModel()
  if name == 'orpo':
    return Orpo(beta=config.orpo.beta, loss_chunk=chunk)
  if name == 'grpo':
    rl = config.rl
    if rl.temperature <= 0:
      raise UserError(f'rl.temperature={rl.temperature} must be > 0: GRPO samples.')
    return Grpo(epsilon=rl.epsilon, beta=rl.beta, temperature=rl.temperature,
                loss_chunk=chunk)
  d = config.dpo
  if d.loss not in DPO_LOSSES:
    raise UserError(f'dpo.loss={d.loss!r} is not one of {", ".join(map(repr, DPO_LOSSES))}.')
  if not 0 <= d.label_smoothing < 0.5 or d.beta <= 0:
    raise UserError(f'dpo.beta={d.beta} must be > 0 and dpo.label_smoothing='
                    f'{d.label_smoothing} in [0, 0.5).')
  return Dpo(beta=d.beta, label_smoothing=d.label_smoothing, loss_type=d.loss,
             loss_chunk=chunk)
