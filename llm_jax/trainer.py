"""Train state, the pure train/eval steps, and the loop (log, eval, checkpoint, stop).

``train_step(state, batch) -> (state, metrics)`` is the only place gradients are
taken. It is a pure function over pytrees: the model's graph definition is
static and its parameters are a plain dict, so one jitted function serves one
CPU, a device mesh and (later) export.
"""

import dataclasses
import functools
import json
import logging
import signal
import time
from typing import Any

from flax import nnx, struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm_jax import checkpoint as ckpt_lib
from llm_jax import decode, lora, metrics, optim, sharding
from llm_jax import loss as loss_lib
from llm_jax.errors import UserError
from llm_jax.model import ModelConfig, Transformer


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates done so far.
  params: Any  # Pure dict of float32 arrays (the model's nnx.Param values).
  opt_state: Any  # Optax state; moments shaped and sharded like params.
  rng: jax.Array  # PRNG key data, for anything stochastic in training.


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


def _loss_fn(params, batch, graphdef, loss_chunk: int = 0):
  # Packed batches (SFT) carry per-example positions and segment ids. With
  # LoRA adapters, no gradient flows to the frozen weights.
  model = nnx.merge(graphdef, lora.freeze_base(params))
  inputs = dict(tokens_BT=batch['inputs'], positions_BT=batch.get('positions'),
                segment_ids_BT=batch.get('segment_ids'))
  if loss_chunk:
    # The LM head is applied chunk by chunk inside the loss (train.loss_chunk).
    loss_sum, count = loss_lib.chunked_cross_entropy(
        model(**inputs, return_hidden=True), model.lm_head_DV(),
        batch['targets'], batch.get('weights'), chunk=loss_chunk)
  else:
    loss_sum, count = cross_entropy(model(**inputs), batch['targets'],
                                    batch.get('weights'))
  # A micro-batch of only prompt tokens has loss 0 (its sum), not NaN.
  return loss_sum / jnp.where(count > 0, count, 1.0), loss_sum


def train_step(state: TrainState, batch: dict, *, graphdef, tx, schedule,
               accum_steps: int, loss_chunk: int = 0) -> tuple[TrainState, dict]:
  """One optimizer update on a global batch, accumulating micro-batch grads."""
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


def eval_step(params, batch: dict, *, graphdef, loss_chunk: int = 0) -> dict:
  """Summed validation loss, weight (token count) and correct argmaxes.

  With ``loss_chunk`` a decoder's logits are never whole, so no argmaxes are
  counted (``correct`` is 0; only encoders report accuracy).
  """
  model = nnx.merge(graphdef, params)
  count = (batch['weights'].astype(jnp.float32).sum() if 'weights' in batch else
           jnp.asarray(batch['targets'].size, jnp.float32))
  if loss_chunk and model.cfg.causal:
    _, loss_sum = _loss_fn(params, batch, graphdef, loss_chunk)
    return {'loss_sum': loss_sum, 'count': count, 'correct': jnp.zeros((), jnp.float32)}
  logits_BTV = model(batch['inputs'], batch.get('positions'),
                     segment_ids_BT=batch.get('segment_ids'))
  loss_sum, count = cross_entropy(logits_BTV, batch['targets'],
                                  batch.get('weights'))
  hits_BT = (jnp.argmax(logits_BTV, axis=-1) == batch['targets']).astype(jnp.float32)
  if 'weights' in batch:
    hits_BT = hits_BT * batch['weights']
  return {'loss_sum': loss_sum, 'count': count, 'correct': hits_BT.sum()}


@dataclasses.dataclass
class Trainer:
  """Everything the loop needs, built once from the config and the data."""
  config: Any
  model_cfg: ModelConfig
  mesh: jax.sharding.Mesh
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: TrainState
  batch_sharding: jax.sharding.NamedSharding
  init_fn: Any
  step_fn: Any
  eval_fn: Any

  @classmethod
  def build(cls, config, vocab_size: int, mesh) -> 'Trainer':
    model_cfg = ModelConfig.from_config(
        config.model, vocab_size=vocab_size, max_len=config.data.seq_len)
    _check_train_config(config, mesh)
    schedule = optim.learning_rate_schedule(config.optim, config.train.steps)
    tx = optim.make_optimizer(config.optim, config.train.steps)
    if lora.enabled(config):  # Only the adapters are trained (and have state).
      tx = lora.optimizer(tx)
    rules = config.mesh.rules

    def init_fn():
      model = _make_model(config, model_cfg, config.seed)
      params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=tx.init(params),
                        rng=jax.random.key_data(jax.random.key(config.seed)))

    # Shapes first (no memory), then shardings from the parameters' logical
    # axes, then init directly into those shardings: no device ever holds a
    # full copy of a sharded parameter.
    graphdef, abstract_params = nnx.split(
        nnx.eval_shape(lambda: _make_model(config, model_cfg, 0)))
    names = sharding.param_names(abstract_params)
    sharding.check_divisible(nnx.to_pure_dict(abstract_params), names, mesh, rules)
    p_shard = sharding.tree_shardings(names, mesh, rules)
    abstract = jax.eval_shape(init_fn)
    rep = sharding.replicated(mesh)
    state_shardings = TrainState(
        step=rep, params=p_shard, rng=rep,
        opt_state=(lora.opt_state_shardings(abstract.opt_state, p_shard, mesh)
                   if lora.enabled(config) else
                   sharding.opt_state_shardings(tx, abstract.opt_state, p_shard, mesh)))
    batch_shard = sharding.batch_sharding(mesh, rules)
    step = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                             accum_steps=config.optim.grad_accum_steps,
                             loss_chunk=config.train.loss_chunk)
    return cls(
        config=config, model_cfg=model_cfg, mesh=mesh, graphdef=graphdef, tx=tx,
        schedule=schedule, state_shardings=state_shardings, batch_sharding=batch_shard,
        init_fn=jax.jit(init_fn, out_shardings=state_shardings),
        step_fn=jax.jit(step, in_shardings=(state_shardings, batch_shard),
                        out_shardings=(state_shardings, rep), donate_argnums=0),
        eval_fn=jax.jit(functools.partial(eval_step, graphdef=graphdef,
                                          loss_chunk=config.train.loss_chunk),
                        in_shardings=(p_shard, batch_shard), out_shardings=rep))

  def unrolled(self, params) -> tuple[ModelConfig, Any, Any]:
    """(model config, graphdef, params) of the same model layer by layer.

    Decoding, export and conversion walk ``blocks/0``, ``blocks/1``, ...; a
    run with ``model.scan_layers`` holds its blocks stacked, so they are
    unstacked here (the same weights). Unscanned models pass through.
    """
    if not self.model_cfg.scan_layers:
      return self.model_cfg, self.graphdef, params
    from llm_jax import model as model_lib  # pylint: disable=g-import-not-at-top
    model_cfg = dataclasses.replace(self.model_cfg, scan_layers=False)
    graphdef = nnx.split(nnx.eval_shape(
        lambda: _make_model(self.config, model_cfg, 0)))[0]
    return model_cfg, graphdef, model_lib.unstack_blocks(params)

  def abstract_state(self) -> TrainState:
    shapes = jax.eval_shape(self.init_fn)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        shapes, self.state_shardings)

  def evaluate(self, params, batches: list[dict]) -> dict:
    """Mean validation loss and perplexity over fixed batches."""
    totals = [self.eval_fn(params, b) for b in batches]
    loss_sum = sum(float(t['loss_sum']) for t in totals)
    count = sum(float(t['count']) for t in totals)
    loss = loss_sum / count
    out = {'val_loss': loss, 'val_ppl': float(np.exp(min(loss, 50)))}
    if not self.model_cfg.causal:
      # The encoder's metric: how often the masked token is the argmax.
      out['val_accuracy'] = sum(float(t['correct']) for t in totals) / count
    return out


def _make_model(config, model_cfg: ModelConfig, seed: int) -> Transformer:
  """The Transformer, with LoRA adapters where ``config.lora`` asks for them."""
  model = Transformer(model_cfg, rngs=nnx.Rngs(seed))
  return lora.apply(model, config.lora, seed) if lora.enabled(config) else model


def _check_train_config(config, mesh) -> None:
  """Refuses train settings that cannot work, before anything is compiled."""
  if config.train.nan_policy not in ('halt', 'skip'):
    raise UserError(f"train.nan_policy={config.train.nan_policy!r}: use 'halt' or 'skip'.")
  batch, accum = config.train.batch_size, config.optim.grad_accum_steps
  ways = sharding.batch_divisor(mesh, config.mesh.rules)
  if accum < 1 or batch % accum:
    raise UserError(f'train.batch_size={batch} must be a multiple of '
                    f'optim.grad_accum_steps={accum} (and that at least 1).')
  if (batch // accum) % ways:
    raise UserError(
        f'Each micro-batch ({batch // accum} sequences) must split evenly over '
        f'the {ways} batch shards of the mesh {dict(mesh.shape)}; make '
        f'train.batch_size a multiple of {ways * accum}.')


class StopSignals:
  """Turns SIGINT/SIGTERM into a request to save and stop at the next step.

  A second Ctrl-C while saving falls back to Python's default (abort now).
  """

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signum
    metrics.say(f'\nReceived {signal.Signals(signum).name}: saving a checkpoint '
                'at the end of this step, then stopping.')

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def checkpoint_meta(config, data, step: int) -> dict:
  """What a checkpoint records besides arrays: enough to refuse a bad resume."""
  import flax, optax as _optax, orbax.checkpoint as _ocp  # pylint: disable=g-import-not-at-top,g-multiple-import
  return {
      'config': json.loads(config.to_json()),
      'step': step,
      'tokenizer_sha256': data.tokenizer.sha256,
      'vocab_size': data.vocab_size,
      'data_sha256': data.manifest['content_sha256'],
      'versions': {'jax': jax.__version__, 'flax': flax.__version__,
                   'optax': _optax.__version__, 'orbax': _ocp.__version__},
      'mesh': dict(zip(sharding.MESH_AXES, sharding.mesh_shape(
          config.mesh, jax.device_count()))),
      'process_count': jax.process_count(),
      'time': time.time(),
  }


def sample_texts(trainer: Trainer, params, tokenizer, config) -> list[tuple[str, str, str]]:
  """(prompt, greedy continuation, sampled continuation) for each prompt."""
  prompts = [p for p in config.train.sample_prompts.split('|') if p]
  prompts = prompts[:config.train.num_samples]
  if not prompts or not trainer.model_cfg.causal:  # An encoder does not continue text.
    return []
  ids = [tokenizer.encode(p) for p in prompts]
  out = []
  _, graphdef, params = trainer.unrolled(params)
  for temperature in (0.0, config.train.sample_temperature):
    new = decode.generate(
        graphdef, params, ids, max_new_tokens=config.train.sample_tokens,
        temperature=temperature, seed=config.seed, max_len=trainer.model_cfg.max_len,
        pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id)
    out.append([tokenizer.decode(t) for t in new])
  return list(zip(prompts, out[0], out[1]))



def _agree_to_stop(local_request: bool, step: int, every: int) -> bool:
  """Whether to stop now: this host's signal, any host's, or a preemption notice.

  With several processes all must stop at the same step (a checkpoint is a
  collective operation). JAX's preemption sync point is meant to be asked
  every step; the signals are shared with an all-gather only every ``every``
  steps, because it waits for the step in flight and would otherwise cost the
  loop its one-step lead.
  """
  if jax.process_count() == 1:
    return local_request
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  try:
    # TPU/GKE maintenance events arrive through JAX's preemption service, at
    # the same step on every host.
    if multihost_utils.reached_preemption_sync_point(step):
      return True
  except RuntimeError:
    pass  # No preemption service in this job.
  if step % max(every, 1):
    return False
  return bool(multihost_utils.process_allgather(np.int32(local_request)).max())


def restore_or_init(trainer: Trainer, ckpt: ckpt_lib.Checkpointer,
                    meta: dict, *, init_from: str = '') -> tuple[TrainState, int]:
  """Resumes from the newest checkpoint that loads, else initialises.

  A fresh run with ``init_from`` (``config.init_from``) takes its parameters
  from there (``finetune.init_state``); a run with checkpoints of its own
  always resumes from those.

  A torn checkpoint (a file cut short, the commit marker gone) is named in a
  warning and the next older one is tried; once one loads, the torn ones are
  moved aside (never deleted) so later saves can reuse their steps. If
  checkpoints exist but none loads, the run stops and moves nothing: it never
  silently starts again from step 0.
  """
  ckpt.warn_unfinished_saves()
  steps, torn = ckpt.all_steps(), []
  for step in steps:
    try:
      if not ckpt.is_committed(step):
        raise FileNotFoundError('its commit marker is missing')
      ckpt_lib.check_compatible(ckpt.metadata(step), meta, ckpt.directory)
      state = ckpt.restore(step, trainer.abstract_state())
    except UserError:
      raise  # A checkpoint that loads but does not fit this run.
    except Exception as e:  # pylint: disable=broad-except
      first_line = (str(e).strip().splitlines() or [''])[0][:200]
      logging.warning('The checkpoint at step %d in %s cannot be read (%s: %s); '
                      'trying an older one.', step, ckpt.directory,
                      type(e).__name__, first_line)
      torn.append(step)
      continue
    for bad in torn:
      logging.warning('Moved the unreadable checkpoint of step %d to %s.', bad,
                      ckpt.set_aside(bad))
    metrics.say(f'Resuming from the checkpoint at step {step} in {ckpt.directory}.')
    return state, int(jax.device_get(state.step))
  if steps:
    raise UserError(
        f'No checkpoint in {ckpt.directory} could be read (steps '
        f'{", ".join(map(str, steps))}; see the warnings above). Move that '
        'directory away to start over, or restore it from a backup.')
  if init_from:
    from llm_jax import finetune  # pylint: disable=g-import-not-at-top
    return finetune.init_state(trainer, init_from), 0
  return trainer.init_fn(), 0


@dataclasses.dataclass
class LoopIO:
  """The loop's outputs: progress line, TensorBoard, throughput, history."""
  progress: metrics.ProgressLine
  tb: metrics.TensorBoard
  thr: metrics.Throughput
  log_every: int
  last: dict = dataclasses.field(default_factory=dict)
  val_history: dict = dataclasses.field(default_factory=dict)
  loss_history: dict = dataclasses.field(default_factory=dict)
  first_step_s: float = 0.0
  save_block_s: list = dataclasses.field(default_factory=list)  # Save calls.
  save_wait_s: list = dataclasses.field(default_factory=list)  # Step they saved.
  nan_policy: str = 'halt'
  max_nan_skips: int = 3
  nan_skipped: int = 0
  nan_streak: int = 0
  # UTF-8 bytes per validation token: with it, evals add bits per byte.
  val_bytes_per_token: float = 0.0
  # More eval metrics, e.g. task scores: (params, step) -> {name: number}.
  extra_eval: Any = None

  def _non_finite(self, step: int, m: dict) -> None:
    """Applies train.nan_policy to a step whose update was not applied."""
    what = f'loss {m["loss"]}, gradient norm {m["grad_norm"]}'
    if self.nan_policy == 'skip' and self.nan_streak < self.max_nan_skips:
      self.nan_skipped += 1
      self.nan_streak += 1
      logging.warning('Step %d: %s; its update was dropped (%d skipped so far, '
                      '%d in a row; train.nan_policy=skip).', step, what,
                      self.nan_skipped, self.nan_streak)
      return
    reason = ('train.nan_policy=halt' if self.nan_policy == 'halt' else
              f'{self.nan_streak + 1} in a row, train.max_nan_skips='
              f'{self.max_nan_skips}')
    raise UserError(
        f'Training stopped at step {step}: {what} ({reason}). The update was '
        'not applied and the last checkpoint is kept. Lower '
        'optim.learning_rate or check the data, then rerun to resume.')

  def evaluate(self, trainer: 'Trainer', params, batches, step: int) -> dict:
    evals = trainer.evaluate(params, batches)
    if self.val_bytes_per_token and trainer.model_cfg.causal:
      # Nats per token over bytes per token, in bits: vocabulary-independent.
      evals['val_bpb'] = evals['val_loss'] / self.val_bytes_per_token / np.log(2)
    if self.extra_eval is not None:
      evals.update(self.extra_eval(params, step))
    self.val_history[step] = evals['val_loss']
    self.tb.scalars(step, evals)
    more = ''.join(f' | {k.removeprefix("val_")} {v:.4f}' for k, v in evals.items()
                   if k not in ('val_loss', 'val_ppl') and isinstance(v, (int, float)))
    metrics.say(f'eval @ step {step} | val loss {evals["val_loss"]:.4f} | '
                f'val ppl {evals["val_ppl"]:.2f}{more}')
    self.thr.restart()
    return evals

  def report(self, step: int, step_metrics) -> None:
    m = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    if not m.pop('finite'):
      self._non_finite(step, m)
    else:
      self.nan_streak = 0
    self.thr.mark(step)
    self.last = m
    self.loss_history[step] = m['loss']
    final = step % self.log_every == 0 or step == self.progress.total
    self.progress.update(step, m, self.thr, final=final)
    if final:
      self.tb.scalars(step, {**m, 'perplexity': np.exp(min(m['loss'], 50)),
                             'tokens_per_sec': self.thr.tokens_per_sec(),
                             'mfu': self.thr.mfu()})


def run_loop(trainer: Trainer, ckpt: ckpt_lib.Checkpointer, state: TrainState,
             start: int, batches, eval_batches: list[dict], io: LoopIO,
             meta_fn) -> tuple[TrainState, dict]:
  """Steps from ``start`` to ``train.steps`` (or ``train.stop_at``, or a signal).

  Returns the state and the final metrics.

  Step N is dispatched before step N-1's metrics are fetched, so the host never
  waits for the device except to read numbers that are already done.
  """
  cfg = trainer.config.train
  pending, evals, stop_signal, stopped_early = None, {}, None, False
  if start == 0:
    io.evaluate(trainer, state.params, eval_batches, 0)
  t_start = time.perf_counter()
  with StopSignals() as stop:
    for step in range(start, cfg.steps):
      batch = sharding.global_batch(next(batches), trainer.batch_sharding)
      state, step_metrics = trainer.step_fn(state, batch)
      if pending is not None:
        io.report(*pending)
      pending, done = (step + 1, step_metrics), step + 1
      if step == start:
        jax.block_until_ready(step_metrics)
        io.first_step_s = time.perf_counter() - t_start
        metrics.say(f'First step (compile + run): {io.first_step_s:.1f}s.')
      is_last = done == cfg.steps
      if is_last or (cfg.eval_every and done % cfg.eval_every == 0):
        io.report(*pending)
        pending = None
        evals = io.evaluate(trainer, state.params, eval_batches, done)
      stop_now = _agree_to_stop(stop.received is not None, done, cfg.log_every)
      stop_here = cfg.stop_at and done >= cfg.stop_at and not is_last
      if is_last or ckpt.should_save(done) or stop_now or stop_here:
        # A save needs the state this step is still computing: waiting for it
        # is the step's own time, counted apart from what the save adds.
        t_wait = time.perf_counter()
        jax.block_until_ready(state)
        t_save = time.perf_counter()
        ckpt.save(done, state, meta_fn(done))  # Async: returns once queued.
        io.save_wait_s.append(t_save - t_wait)
        io.save_block_s.append(time.perf_counter() - t_save)
      if stop_now or stop_here:
        # Another host's signal or a preemption notice counts as a SIGTERM.
        stop_signal = stop.received or (signal.SIGTERM if stop_now else None)
        stopped_early = True
        break
    if pending is not None:
      io.report(*pending)
  ckpt.wait()
  io.tb.flush()
  result = {'step': int(jax.device_get(state.step)), **io.last, **evals,
            'tokens_per_sec': io.thr.tokens_per_sec(), 'mfu': io.thr.mfu(),
            'train_seconds': time.perf_counter() - t_start,
            'val_history': io.val_history, 'loss_history': io.loss_history,
            'stopped_by_signal': stop_signal, 'stopped_early': stopped_early,
            'nan_skipped': io.nan_skipped, 'first_step_seconds': io.first_step_s,
            'save_block_seconds': io.save_block_s, 'save_wait_seconds': io.save_wait_s}
  return state, result
