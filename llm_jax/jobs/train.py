"""One training job: data, trainer, restore or init, the loop, samples, summary.

``run(config, workdir)`` is what ``python -m llm_jax.train`` and notebooks call.
Every objective of the trainer goes through it: a decoder LM on token windows,
an encoder's masked LM (the same windows, masked per step from (seed, step)),
SFT on packed chat examples, a reward model, DPO and ORPO on preference pairs,
GRPO on rollouts of prompts (docs/alignment.md) and an encoder's task head
(``model.head``: classification or QA rows from ``task.*``). ``_Inputs`` hides
which: it serves the train batches from any step and the fixed validation
batches.
"""

import contextlib
import dataclasses
import functools
import json
import os
import resource
import time
from typing import Any
from collections.abc import Callable, Iterator

from etils import epath
import jax
import numpy as np

from llm_jax.core import files
from llm_jax.core.configuration import check_keys
from llm_jax.core.errors import UserError
from llm_jax.data import masking, pipeline, preference, sft, shards
from llm_jax.data import tasks as task_data
from llm_jax.evaluation import encoder_tasks, tasks
from llm_jax.inference import rollouts as rollouts_lib
from llm_jax.runs import init_from as init_from_lib
from llm_jax.runs import workdir as workdir_lib
from llm_jax.training import checkpoint, loop, metrics, objectives, sharding, trainer, xla_cache


def _write_config(config, workdir: str) -> None:
  """Writes the resolved config to workdir/config.json (whole or not at all)."""
  if jax.process_index() != 0:
    return
  text = json.dumps(json.loads(config.to_json()), indent=2)
  try:
    files.atomic_write(str(epath.Path(workdir) / workdir_lib.CONFIG_FILE), text)
  except OSError as e:
    raise workdir_lib.unwritable(workdir, e) from None


def _make_workdir(workdir: str) -> str:
  """Creates the run directory (local, or a gs:// path every host can see)."""
  if '://' not in workdir:
    workdir = os.path.abspath(workdir)
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f'Cannot create the run directory {workdir}: {e}. Pick a '
                    'writable --workdir.') from e
  return workdir


def run(config, workdir: str | None = None, *,
        on_eval: Callable[[int, dict], bool] | None = None) -> dict:
  """Prepares data, trains (or resumes) and returns the final metrics.

  Args:
    config: a ConfigDict shaped like configs/base.py.
    workdir: the run directory; default runs/<config.name>.
    on_eval: called after each evaluation during training with (step, evals);
      returning True stops the run there with a checkpoint (``stopped_early``
      and ``stopped_on_eval`` in the result). Sweeps prune trials with it.

  Returns:
    Final metrics: step, loss, val_loss, val_ppl, loss_history, val_history,
    tokens_per_sec, mfu, unigram_entropy, peak_rss_gib, wall_seconds, workdir,
    samples.

  Raises:
    UserError: a bad config value (before anything is created), another
      training process holding the run directory, or bad data.
  """
  t0 = time.perf_counter()
  check_keys(config)
  trainer.check_config(config)  # Bad values fail here, before anything is created.
  workdir = _make_workdir(workdir or os.path.join('runs', config.name))
  # One trainer per run directory: a second one would interleave checkpoints.
  # Its compiled steps go to <workdir>/xla_cache; a restart reads them from there.
  cache = xla_cache.scoped(workdir) if config.train.compile_cache else contextlib.nullcontext()
  with workdir_lib.training_lock(workdir), cache:
    return _run_in(config, workdir, t0, on_eval)


def _run_in(config, workdir: str, t0: float, on_eval) -> dict:
  """``run`` once the run directory is ours."""
  _refuse_a_silent_restart(config, workdir)
  if config.init_from:
    init_from_lib.use_source_tokenizer(config)  # Before config.json records it.
  _write_config(config, workdir)
  inputs = _Inputs.prepare(config)
  data = inputs.data
  if inputs.is_task and config.model.head == 'classification':
    # The label set (from the training file unless given) sizes the head.
    config.task.labels = ','.join(data.labels)
    config.model.num_labels = len(data.labels)
    _write_config(config, workdir)
  if jax.process_index() == 0:
    # The workdir is complete on its own: generate/evaluate/export need no cache.
    workdir_lib.save_tokenizer(workdir, data.tokenizer)
  if config.objective == 'lm' and not inputs.is_task:
    metrics.say(f'Unigram entropy of the training tokens: {data.unigram_entropy:.3f} '
                'nats/token (a model must beat this to have learnt anything).')
  mesh = sharding.make_mesh(config.mesh)
  tr = trainer.Trainer.build(config, data.vocab_size, mesh)
  metrics.say(f'Model: {tr.model_cfg.num_params():,} parameters; mesh '
              f'{dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} '
              f'device(s); workdir {workdir}')
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, workdir_lib.CHECKPOINTS_DIR),
                                 every=config.checkpoint.every, keep=config.checkpoint.keep,
                                 keep_every=config.checkpoint.keep_every)
  try:
    state, result = _resume_and_train(config, tr, ckpt, inputs, workdir, on_eval)
  finally:
    ckpt.close()  # Even on an error, a save in flight is finished, not left torn.
  if result.get('stopped_early'):
    how = ('Run the same command to resume.' if result.get('stopped_by_signal') else
           'The caller asked to stop after that evaluation (a sweep pruned it).'
           if result.get('stopped_on_eval') else
           'Run again with a larger --config.train.stop_at (or 0) to go on.')
    metrics.say(f'Stopped at step {result["step"]} with a checkpoint saved in '
                f'{ckpt.directory}. {how}')
    return result
  result['samples'] = trainer.sample_texts(tr, state.params, data.tokenizer, config)
  result.update(unigram_entropy=getattr(data, 'unigram_entropy', float('nan')),
                objective=config.objective, workdir=workdir,
                vocab_size=data.vocab_size, wall_seconds=time.perf_counter() - t0,
                peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
  if inputs.is_task:
    _summarise_task(result, data)
  else:
    _summarise(result)
  return result


def _refuse_a_silent_restart(config, workdir: str) -> None:
  """Refuses step 0 where an earlier start trained but no checkpoint is left.

  TensorBoard events past step 0 with no checkpoint mean the checkpoints were
  deleted or moved (or that run stopped before its first save): training from
  scratch would quietly throw the run away and draw a second curve over the
  first. ``train.allow_fresh_start`` says that is meant; the old events are
  then moved aside (never deleted) so the new curve starts clean.
  """
  ckpts = epath.Path(workdir) / workdir_lib.CHECKPOINTS_DIR
  if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
    return  # Checkpoints (whole or torn) to resume from: restore_or_init decides.
  logdir = os.path.join(workdir, 'tb')
  last = metrics.last_logged_step(logdir)
  if not last:
    return
  if not config.train.allow_fresh_start:
    raise UserError(
        f'{workdir} was trained before (TensorBoard has its curve up to step {last}) '
        f'but {ckpts} holds no checkpoint: they were deleted or moved, or '
        'that run stopped before its first save. Put the checkpoints back to resume, '
        'or pass --config.train.allow_fresh_start=True to train from step 0 here '
        '(the old tb/ is kept beside it), or use a new --workdir.')
  moved = f'{logdir}.before-{time.strftime("%Y%m%d-%H%M%S")}'
  if jax.process_index() == 0:
    epath.Path(logdir).rename(moved)
  metrics.say(f'Training from step 0 (train.allow_fresh_start): the earlier '
              f'TensorBoard events, up to step {last}, are now in {moved}.')


@dataclasses.dataclass
class _Inputs:
  """The run's data, whichever objective: train batches and validation batches."""
  config: Any
  # shards.PreparedData, sft.SftData, preference.PreferenceData or PromptData.
  data: Any
  masker: masking.Masker | None  # Encoders: masked LM from (seed, step).
  reward: Any = None  # GRPO: rollouts.FunctionReward or ModelReward.

  @classmethod
  def prepare(cls, config) -> '_Inputs':
    _check_source(config)
    # With init_from, the model keeps the source's rows even where its
    # vocabulary is padded past the tokenizer's.
    floor = init_from_lib.source_vocab_size(config.init_from) if config.init_from else 0
    if config.data.source == 'sft':  # Instruction tuning: packed chat examples.
      data = sft.prepare(config, log=metrics.say)
      return cls(config, dataclasses.replace(data, vocab_floor=floor), None)
    if config.model.head != 'lm':  # An encoder's task head: labelled rows.
      root = shards.cache_root(config.data)
      return cls(config, task_data.prepare(
          config, log=metrics.say, vocab_floor=floor,
          get_tokenizer=lambda texts: shards.get_tokenizer(config, texts, root,
                                                           metrics.say)), None)
    if config.data.source == 'preference':  # Reward model, DPO, ORPO: pairs.
      return cls(config, preference.prepare(config, log=metrics.say), None)
    if config.data.source == 'prompts':  # GRPO: completions sampled per step.
      data = preference.prepare_prompts(config, log=metrics.say)
      return cls(config, data, None, _reward_source(config, data.tokenizer))
    data = dataclasses.replace(shards.prepare(config, log=metrics.say), vocab_floor=floor)
    masker = None
    if config.model.kind == 'encoder':
      masker = masking.Masker.from_tokenizer(
          data.tokenizer, seed=config.seed, global_batch=config.train.batch_size,
          **_hosts())
    return cls(config, data, masker)

  @property
  def is_sft(self) -> bool:
    """Conversations (SFT rows, pairs, prompts): the data serves its batches."""
    return isinstance(self.data, (sft.SftData, preference.PreferenceData,
                                  preference.PromptData))

  @property
  def is_rollouts(self) -> bool:
    return isinstance(self.data, preference.PromptData)

  def rollouts(self, tr, start: int) -> rollouts_lib.Rollouts:
    """GRPO's batch server from step ``start``, sampling with ``tr``'s shardings."""
    c, hosts = self.config, _hosts()
    rows = c.train.batch_size // hosts['process_count']
    if rows % c.rl.num_generations:
      raise UserError(f'train.batch_size={c.train.batch_size} counts completions: each '
                      f'host\'s share ({rows}) must be a multiple of '
                      f'rl.num_generations={c.rl.num_generations}.')
    graphdef = tr.unrolled(tr.abstract_state().params)[1]
    sampler = rollouts_lib.make_sampler(
        graphdef, lambda p: tr.unrolled(p)[2], tr.state_shardings.params,
        tr.batch_sharding, width=c.rl.max_new_tokens,
        stop_ids=(self.data.tokenizer.eos_id,), pad_id=max(self.data.tokenizer.pad_id, 0),
        temperature=c.rl.temperature)
    tail = c.sft.template.split('{content}')[1]
    return rollouts_lib.Rollouts(
        prompts=self.data.train, val_prompts=self.data.val, tokenizer=self.data.tokenizer,
        sampler=sampler, reward=self.reward, group=c.rl.num_generations, rows=rows,
        seq_len=c.data.seq_len, max_new_tokens=c.rl.max_new_tokens, seed=c.seed,
        step=start, template_tail=tail, eval_prompts=c.rl.eval_prompts, **hosts)

  @property
  def is_task(self) -> bool:
    return isinstance(self.data, task_data.TaskData)

  @property
  def serves_rows(self) -> bool:
    """SFT and task data serve their own batches (not token windows)."""
    return self.is_sft or self.is_task

  def _windows(self, paths):
    return pipeline.TokenWindows(paths, self.data.manifest['dtype'],
                                 self.config.data.seq_len)

  def num_windows(self) -> int:
    return (self.data.num_windows if self.serves_rows else
            self._windows(self.data.train_shards).num_windows)

  def eval_batches(self) -> list[dict]:
    kw = dict(global_batch=self.config.train.batch_size,
              num_batches=self.config.train.eval_batches, **_hosts())
    if self.is_rollouts:  # Held-out prompts are scored by Rollouts.evaluate.
      return []
    if self.serves_rows:  # SFT, pair and task data serve their own batches.
      return self.data.eval_batches(**kw)
    batches = pipeline.eval_batches(self._windows(self.data.val_shards), **kw)
    return batches if self.masker is None else self.masker.eval_batches(batches)

  def train_batches(self, start: int) -> Iterator[dict]:
    kw = dict(global_batch=self.config.train.batch_size, seed=self.config.seed,
              start_step=start, **_hosts())
    if self.serves_rows:
      return self.data.train_batches(**kw)
    batches = pipeline.train_batches(self._windows(self.data.train_shards), **kw)
    return batches if self.masker is None else self.masker.train_batches(batches, start)

  def val_bytes_per_token(self) -> float:
    """UTF-8 bytes per validation token (0 for SFT): evals add bits per byte."""
    return (0.0 if self.serves_rows else
            self.data.manifest['splits']['val']['bytes_per_token'])


def _reward_source(config, tokenizer):
  """GRPO's reward: ``rl.reward`` (a function) or ``rl.reward_model`` (a run)."""
  rl = config.rl
  if bool(rl.reward) == bool(rl.reward_model):
    raise UserError('objective=grpo needs one reward: set --config.rl.reward='
                    'module:function or --config.rl.reward_model=RUN (not both).')
  if rl.reward:
    return rollouts_lib.FunctionReward.load(rl.reward)
  run = workdir_lib.load(rl.reward_model)
  if objectives.objective_of(run.config) != 'reward':
    raise UserError(f'rl.reward_model={rl.reward_model} is not a reward model (its '
                    f'objective is {objectives.objective_of(run.config)!r}); train one '
                    'with configs/reward.py.')
  if run.tokenizer is None or run.tokenizer.sha256 != tokenizer.sha256:
    raise UserError(f'rl.reward_model={rl.reward_model} reads another tokenizer than '
                    f'the policy ({tokenizer.path}): its ids would mean other text. '
                    'Train the reward model from the same SFT run '
                    '(configs/reward.py:RUN).')
  return rollouts_lib.ModelReward.from_run(rl.reward_model, run)


_SOURCES = {'reward': 'preference', 'dpo': 'preference', 'orpo': 'preference',
            'grpo': 'prompts'}


def _check_source(config) -> None:
  """The data an objective reads: pairs for reward/DPO/ORPO, prompts for GRPO."""
  want = _SOURCES.get(config.objective)
  source = config.data.source
  if want and source != want:
    raise UserError(f'objective={config.objective!r} reads data.source={want!r} '
                    f'(data.source is {source!r}); set --config.data.source={want} '
                    'or start from its preset (configs/reward.py, dpo.py, grpo.py).')
  if not want and source in _SOURCES.values():
    raise UserError(f'data.source={source!r} is for objective='
                    f'{"grpo" if source == "prompts" else "reward, dpo or orpo"}; '
                    f'objective is {config.objective!r}.')


def _hosts() -> dict:
  return dict(process_index=jax.process_index(), process_count=jax.process_count())


def _resume_and_train(config, tr, ckpt, inputs: _Inputs, workdir, on_eval):
  """Restores or initialises the state, then trains what is left of the run."""
  meta_fn = lambda step: trainer.checkpoint_meta(config, inputs.data, step)
  init = (functools.partial(init_from_lib.init_state, tr, config.init_from)
          if config.init_from else None)
  state, start = loop.restore_or_init(tr, ckpt, meta_fn(0), init=init)
  eval_batches = [sharding.global_batch(b, tr.batch_sharding)
                  for b in inputs.eval_batches()]
  if config.train.stop_at and start >= config.train.stop_at < config.train.steps:
    metrics.say(f'Already at step {start}, at or past train.stop_at='
                f'{config.train.stop_at}: nothing to do. Raise it, or set it to 0 to '
                f'train on to train.steps={config.train.steps}.')
    return state, {'step': start, 'stopped_early': True, 'stop_at': True,
                   'val_history': {}, 'loss_history': {}}
  if start >= config.train.steps:
    metrics.say(f'Training is already complete: the checkpoint is at step {start} '
                f'and train.steps={config.train.steps}. Raise '
                '--config.train.steps to train further.')
    evals = tr.evaluate(state.params, eval_batches, ref_params=state.ref_params)
    if inputs.val_bytes_per_token() and tr.model_cfg.causal:
      evals['val_bpb'] = loop.bits_per_byte(evals['val_loss'], inputs.val_bytes_per_token())
    if inputs.is_rollouts:  # GRPO's held-out reward comes from its rollouts.
      evals.update(inputs.rollouts(tr, start).evaluate(state.params, start))
    return state, {'step': start, 'val_history': {}, 'loss_history': {}, **evals}
  return _train(config, tr, ckpt, state, start, inputs, eval_batches, workdir, meta_fn,
                on_eval)


def _train(config, tr, ckpt, state, start, inputs: _Inputs, eval_batches, workdir,
           meta_fn: Callable[[int], dict], on_eval):
  """Runs the loop with its outputs wired up; returns (final state, metrics)."""
  seq_len, batch = config.data.seq_len, config.train.batch_size
  peak, peak_source = metrics.peak_flops(config.train.peak_flops)
  flops = metrics.train_flops_per_token(tr.model_cfg, seq_len)
  rows = 2 if tr.objective.is_pairwise else 1  # A pair is two sequences.
  metrics.say(f'MFU: {flops / 1e6:.1f} MFLOP/token (6N + attention) against '
              f'{peak_source}.')
  io = loop.LoopIO(
      progress=metrics.ProgressLine(config.train.steps),
      tb=metrics.TensorBoard(os.path.join(workdir, 'tb')),
      thr=metrics.Throughput(rows * batch * seq_len, flops, peak),
      log_every=config.train.log_every, nan_policy=config.train.nan_policy,
      max_nan_skips=config.train.max_nan_skips,
      val_bytes_per_token=inputs.val_bytes_per_token(), on_eval=on_eval)
  if config.train.eval_tasks and not inputs.serves_rows:
    io.extra_eval = tasks.loop_task_eval(config, tr, inputs.data.tokenizer)
  if inputs.is_task:  # Accuracy and macro-F1, or SQuAD exact match and F1.
    io.extra_eval = encoder_tasks.loop_task_eval(config, tr, inputs.data)
  if inputs.is_rollouts:  # GRPO: each step's batch is sampled from its state.
    batches = inputs.rollouts(tr, start)
    io.extra_eval = batches.evaluate
  else:
    batches = inputs.train_batches(start)
  metrics.say(f'Training steps {start + 1}..{config.train.steps} on batches of '
              f'{batch} x {seq_len} tokens ({inputs.num_windows():,} windows per epoch).')
  failed = True
  try:
    state, result = loop.run_loop(tr, ckpt, state, start, batches, eval_batches,
                                  io, meta_fn)
    failed = False
  finally:
    # Stops a prefetch thread now, not at garbage collection (GRPO's rollout
    # function has nothing to stop).
    getattr(batches, 'close', lambda: None)()
    # A failing run (a full disk) keeps its own error, not the event file's.
    io.tb.close(quiet=failed)
  return state, {**result, 'tokens_per_step': rows * batch * seq_len}


def _summarise_task(r: dict, data) -> None:
  """The task's scores against its trivial baseline."""
  if data.head == 'classification':
    counts = np.bincount(data.val_rows['labels'][:, 0], minlength=len(data.labels))
    metrics.say(f'Done at step {r["step"]}: validation accuracy {r["task_accuracy"]:.4f}, '
                f'macro-F1 {r["task_macro_f1"]:.4f}; always answering the majority label '
                f'scores {counts.max() / counts.sum():.4f}.')
  else:
    metrics.say(f'Done at step {r["step"]}: validation SQuAD exact match '
                f'{r["task_exact_match"]:.2f}, F1 {r["task_f1"]:.2f} (percent).')
  metrics.say(f'Run directory: {r["workdir"]}. Scores on other data: python -m '
              f'llm_jax.evaluate --workdir={r["workdir"]} --task_data=FILE')


def _summarise(r: dict) -> None:
  for prompt, greedy, sampled in r['samples']:
    metrics.say(f'--- prompt {prompt!r}\n[greedy]  {prompt}{greedy}\n'
                f'[sampled] {prompt}{sampled}')
  costs = (f'Wall time {metrics.format_duration(r["wall_seconds"])}, '
           f'peak memory {r["peak_rss_gib"]:.2f} GiB.')
  if r['objective'] != 'lm':
    metrics.say(f'Done at step {r["step"]}: ' + _alignment_headline(r) + ' ' + costs)
  else:
    half = r['unigram_entropy'] / 2
    verdict = 'below' if r['val_loss'] < half else 'NOT below'
    metrics.say(
        f'Done at step {r["step"]}: val loss {r["val_loss"]:.4f} (ppl {r["val_ppl"]:.2f}), '
        f'{verdict} half the unigram entropy ({half:.3f}). ' + costs)
  if 'val_accuracy' in r and r['objective'] == 'lm':  # An encoder's masked tokens.
    metrics.say(f'Masked-token accuracy {r["val_accuracy"]:.4f} (python -m '
                f'llm_jax.fill_mask --workdir={r["workdir"]} --text="... <mask> ...").')
  if r.get('save_block_seconds') and r.get('tokens_per_sec'):
    step_s = r['tokens_per_step'] / r['tokens_per_sec']
    held = sorted(r['save_block_seconds'])
    metrics.say(f'First step (compile + run) {r["first_step_seconds"]:.1f}s; '
                f'{len(held)} async checkpoint saves held the loop {1000 * held[len(held) // 2]:.0f} '
                f'ms (median), {1000 * held[-1]:.0f} ms at most, beyond finishing the step '
                f'they save; a step takes {1000 * step_s:.0f} ms.')
  metrics.say(f'Run directory: {r["workdir"]} (checkpoints/, tb/, config.json). '
              f'TensorBoard: tensorboard --logdir {r["workdir"]}/tb')


def _alignment_headline(r: dict) -> str:
  """The held-out figures an alignment run is judged by."""
  if r['objective'] == 'grpo':
    return (f'held-out reward {r["val_reward"]:.4f} (greedy completions of '
            f'{r["val_prompts"]} prompts).')
  return (f'held-out pairs: loss {r["val_loss"]:.4f}, reward accuracy '
          f'{r["val_accuracy"]:.4f} (chosen above rejected), mean margin '
          f'{r["val_margin"]:.4f}.')
