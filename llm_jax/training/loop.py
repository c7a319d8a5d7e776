"""The training loop: restore or initialise, step, log, evaluate, save, stop.

``run_loop`` dispatches step N before it reads step N-1's numbers, so the host
never waits for the device except for values already computed. Stopping is
cooperative: SIGINT/SIGTERM (``StopSignals``), a preemption notice,
``train.stop_at`` or the caller's ``LoopIO.on_eval`` (a sweep's pruner) finish
the step, save a checkpoint and return.
"""

import dataclasses
import logging
import signal
import time
from typing import Any
from collections.abc import Callable

import jax
import numpy as np

from llm_jax.core.errors import UserError
from llm_jax.training import checkpoint as ckpt_lib
from llm_jax.training import metrics, sharding
from llm_jax.training.steps import TrainState
from llm_jax.training.trainer import Trainer


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
                    meta: dict, *, init: Callable[[], TrainState] | None = None
                    ) -> tuple[TrainState, int]:
  """Resumes from the newest checkpoint that loads, else initialises.

  A fresh run starts from ``init()`` (default ``trainer.init_fn``; a run with
  ``config.init_from`` passes ``llm_jax.runs.init_from.init_state``); a run
  with checkpoints of its own always resumes from those.

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
  return (init or trainer.init_fn)(), 0


def bits_per_byte(loss_nats_per_token: float, bytes_per_token: float) -> float:
  """Nats per token over bytes per token, in bits: vocabulary-independent."""
  return loss_nats_per_token / bytes_per_token / np.log(2)


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
  # Called after each evaluation during training (the last one too), (step,
  # evals) -> True to stop there with a checkpoint (a sweep's pruner). With
  # several processes it must answer the same on each.
  on_eval: Callable[[int, dict], bool] | None = None

  def asks_to_stop(self, step: int, evals: dict) -> bool:
    """Whether ``on_eval`` asks to stop after the evaluation at ``step``."""
    return bool(self.on_eval is not None and self.on_eval(step, evals))

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

  def evaluate(self, trainer: 'Trainer', state: TrainState, batches, step: int) -> dict:
    params = state.params
    evals = trainer.evaluate(params, batches, ref_params=state.ref_params)
    if self.val_bytes_per_token and trainer.model_cfg.causal:
      evals['val_bpb'] = bits_per_byte(evals['val_loss'], self.val_bytes_per_token)
    if self.extra_eval is not None:
      evals.update(self.extra_eval(params, step))
    # GRPO's headline is the held-out reward; everything else has a loss.
    self.val_history[step] = evals['val_loss' if 'val_loss' in evals else 'val_reward']
    self.tb.scalars(step, evals)
    shown = [('val loss', 'val_loss', '.4f'), ('val ppl', 'val_ppl', '.2f')]
    head = [f'{name} {evals[k]:{fmt}}' for name, k, fmt in shown if k in evals]
    more = [f'{k.removeprefix("val_")} {v:.4f}' for k, v in evals.items()
            if k not in ('val_loss', 'val_ppl') and isinstance(v, (int, float))]
    metrics.say(' | '.join([f'eval @ step {step}'] + head + more))
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

  Returns the state and the final metrics; ``stopped_on_eval`` says that
  ``io.on_eval`` stopped the run before ``train.steps``. ``batches`` is an
  iterator of host batches, or a function of the current state that returns
  the next one (GRPO's rollouts sample from the parameters of the step they
  train).

  Step N is dispatched before step N-1's metrics are fetched, so the host never
  waits for the device except to read numbers that are already done.
  """
  cfg = trainer.config.train
  pending, evals, stop_signal, stopped_early = None, {}, None, False
  asked = False  # io.on_eval asked to stop.
  ckpt.prepare(state)  # Off the loop's thread, while the first step compiles.
  if start == 0:
    io.evaluate(trainer, state, eval_batches, 0)
  t_start = time.perf_counter()
  with StopSignals() as stop:
    for step in range(start, cfg.steps):
      # On-policy objectives (GRPO) make their batch from the current state.
      local = batches(state) if callable(batches) else next(batches)
      batch = sharding.global_batch(local, trainer.batch_sharding)
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
        evals = io.evaluate(trainer, state, eval_batches, done)
        asked = io.asks_to_stop(done, evals) and not is_last  # The last: done anyway.
      stop_now = _agree_to_stop(stop.received is not None, done, cfg.log_every)
      stop_here = asked or (cfg.stop_at and done >= cfg.stop_at and not is_last)
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
            'stopped_on_eval': asked,
            'nan_skipped': io.nan_skipped, 'first_step_seconds': io.first_step_s,
            'save_block_seconds': io.save_block_s, 'save_wait_seconds': io.save_wait_s}
  return state, result
