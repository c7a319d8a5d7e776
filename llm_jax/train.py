r"""Train a language model: ``python -m llm_jax.train --config=configs/base.py``.

Flags:
  --config=FILE        an ml_collections config file (``get_config()``);
  --config.a.b=VALUE   override any key that configs/base.py declares;
  --workdir=DIR        where checkpoints, TensorBoard events and config.json go
                       (default runs/<config.name>). Rerunning with the same
                       workdir resumes from its latest checkpoint.

Notebooks call the same entry point: ``llm_jax.train.run(config, workdir)``.
Ctrl-C or SIGTERM saves a checkpoint of the current step and exits with status
128 + the signal number (130 for Ctrl-C, 143 for SIGTERM); bad input exits 2.
"""

import functools
import json
import os
import re
import resource
import sys
import time

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from llm_jax.configuration import check_keys
from llm_jax import cli
from llm_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/base.py.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', '', 'Run directory (default runs/<config.name>); reruns resume.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator', '', 'Multi-host: HOST:PORT of process 0 (not needed on TPU VMs '
    'or under SLURM, where JAX finds it).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Multi-host: processes in all.')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'Multi-host: this process, 0..N-1.')
_DRY_RUN = flags.DEFINE_bool(
    'dry_run', False, 'Compile one train step for the configured mesh and print '
    'per-device memory (parameters, optimizer state, temporaries); no training.')
_TOPOLOGY = flags.DEFINE_string(
    'topology', '', 'With --dry_run: compile for this TPU slice instead of the '
    "local devices, e.g. v5p:2x2x1 (needs pip install -e '.[tpu]').")


def _write_config(config, workdir: str) -> None:
  """Writes the resolved config to workdir/config.json (whole or not at all)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir) / 'config.json'
  tmp = path.with_name('config.json.tmp')
  tmp.write_text(json.dumps(json.loads(config.to_json()), indent=2))
  tmp.replace(path)


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


def run(config, workdir: str | None = None) -> dict:
  """Prepares data, trains (or resumes) and returns the final metrics.

  Args:
    config: a ConfigDict shaped like configs/base.py.
    workdir: the run directory; default runs/<config.name>.

  Returns:
    Final metrics: step, loss, val_loss, val_ppl, loss_history, val_history,
    tokens_per_sec, mfu, unigram_entropy, peak_rss_gib, wall_seconds, workdir,
    samples.
  """
  t0 = time.perf_counter()
  check_keys(config)
  workdir = _make_workdir(workdir or os.path.join('runs', config.name))
  import jax  # pylint: disable=g-import-not-at-top
  from llm_jax import checkpoint, metrics, sharding, trainer  # pylint: disable=g-import-not-at-top
  from llm_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from llm_jax.data import shards  # pylint: disable=g-import-not-at-top

  if config.init_from:
    from llm_jax import finetune  # pylint: disable=g-import-not-at-top
    finetune.use_source_tokenizer(config)  # Before config.json records it.
  _write_config(config, workdir)
  if config.train.compile_cache:
    # Compiled steps persist across restarts: a resumed run starts sooner.
    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'xla_cache'))
  if config.data.source == 'sft':  # Instruction tuning: packed chat examples.
    from llm_jax.data import sft  # pylint: disable=g-import-not-at-top
    data = sft.prepare(config, log=metrics.say)
  else:
    data = shards.prepare(config, log=metrics.say)
  if jax.process_index() == 0:
    # The workdir is complete on its own: generate/evaluate/export need no cache.
    workdir_lib.save_tokenizer(workdir, data.tokenizer.model_bytes)
  metrics.say(f'Unigram entropy of the training tokens: {data.unigram_entropy:.3f} '
              'nats/token (a model must beat this to have learnt anything).')
  mesh = sharding.make_mesh(config.mesh)
  tr = trainer.Trainer.build(config, data.vocab_size, mesh)
  metrics.say(f'Model: {tr.model_cfg.num_params():,} parameters; mesh '
              f'{dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} '
              f'device(s); workdir {workdir}')
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                 every=config.checkpoint.every, keep=config.checkpoint.keep,
                                 keep_every=config.checkpoint.keep_every)
  try:
    state, result = _resume_and_train(config, tr, ckpt, data, workdir)
  finally:
    ckpt.close()  # Even on an error, a save in flight is finished, not left torn.
  if result.get('stopped_early'):
    how = ('Run the same command to resume.' if result.get('stopped_by_signal') else
           'Run again with a larger --config.train.stop_at (or 0) to go on.')
    metrics.say(f'Stopped at step {result["step"]} with a checkpoint saved in '
                f'{ckpt.directory}. {how}')
    return result
  result['samples'] = trainer.sample_texts(tr, state.params, data.tokenizer, config)
  result.update(unigram_entropy=data.unigram_entropy, workdir=workdir,
                vocab_size=data.vocab_size, wall_seconds=time.perf_counter() - t0,
                peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
  _summarise(result)
  return result


def _resume_and_train(config, tr, ckpt, data, workdir):
  """Restores or initialises the state, then trains what is left of the run."""
  import jax  # pylint: disable=g-import-not-at-top
  from llm_jax import metrics, sharding, trainer  # pylint: disable=g-import-not-at-top
  from llm_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  meta_fn = lambda step: trainer.checkpoint_meta(config, data, step)
  state, start = trainer.restore_or_init(tr, ckpt, meta_fn(0),
                                         init_from=config.init_from)
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
  if config.data.source == 'sft':  # data.sft.SftData serves its own batches.
    train_w, local_eval = data, data.eval_batches(
        global_batch=config.train.batch_size, num_batches=config.train.eval_batches,
        **hosts)
  else:
    train_w, val_w = (pipeline.TokenWindows(paths, data.manifest['dtype'],
                                            config.data.seq_len)
                      for paths in (data.train_shards, data.val_shards))
    local_eval = _mlm_eval(config, data, pipeline.eval_batches(
        val_w, global_batch=config.train.batch_size,
        num_batches=config.train.eval_batches, **hosts))
  eval_batches = [sharding.global_batch(b, tr.batch_sharding) for b in local_eval]
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
    return state, {'step': start, 'val_history': {}, 'loss_history': {},
                   **tr.evaluate(state.params, eval_batches)}
  return _train(config, tr, ckpt, state, start, train_w, eval_batches, workdir, meta_fn,
                data=data)


def _masker(config, data):
  """The masked-LM masker of an encoder run; None for a decoder."""
  if config.model.kind != 'encoder':
    return None
  import jax  # pylint: disable=g-import-not-at-top
  from llm_jax.data import masking  # pylint: disable=g-import-not-at-top
  return masking.Masker.from_tokenizer(
      data.tokenizer, seed=config.seed, global_batch=config.train.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())


def _mlm_eval(config, data, batches: list[dict]) -> list[dict]:
  masker = _masker(config, data)
  return batches if masker is None else masker.eval_batches(batches)


def _train(config, tr, ckpt, state, start, train_w, eval_batches, workdir, meta_fn,
           data=None):
  """Runs the loop with its outputs wired up; returns (final state, metrics)."""
  import jax  # pylint: disable=g-import-not-at-top
  from llm_jax import metrics, trainer  # pylint: disable=g-import-not-at-top
  from llm_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  seq_len, batch = config.data.seq_len, config.train.batch_size
  peak, peak_source = metrics.peak_flops(config.train.peak_flops)
  flops = metrics.train_flops_per_token(tr.model_cfg, seq_len)
  metrics.say(f'MFU: {flops / 1e6:.1f} MFLOP/token (6N + attention) against '
              f'{peak_source}.')
  io = trainer.LoopIO(
      progress=metrics.ProgressLine(config.train.steps),
      tb=metrics.TensorBoard(os.path.join(workdir, 'tb')),
      thr=metrics.Throughput(batch * seq_len, flops, peak),
      log_every=config.train.log_every, nan_policy=config.train.nan_policy,
      max_nan_skips=config.train.max_nan_skips)
  make_batches = (train_w.train_batches if config.data.source == 'sft' else
                  functools.partial(pipeline.train_batches, train_w))
  batches = make_batches(
      global_batch=batch, seed=config.seed, start_step=start,
      process_index=jax.process_index(), process_count=jax.process_count())
  if data is not None and config.data.source != 'sft':
    io.val_bytes_per_token = data.manifest['splits']['val']['bytes_per_token']
    masker = _masker(config, data)
    if masker is not None:  # Encoder: masked per step from (seed, step).
      batches = masker.train_batches(batches, start)
    if config.train.eval_tasks:
      from llm_jax import evaluate  # pylint: disable=g-import-not-at-top
      io.extra_eval = evaluate.loop_task_eval(config, tr, data.tokenizer)
  metrics.say(f'Training steps {start + 1}..{config.train.steps} on batches of '
              f'{batch} x {seq_len} tokens ({train_w.num_windows:,} windows per epoch).')
  state, result = trainer.run_loop(tr, ckpt, state, start, batches, eval_batches,
                                   io, meta_fn)
  return state, {**result, 'tokens_per_step': batch * seq_len}


def _summarise(r: dict) -> None:
  from llm_jax import metrics  # pylint: disable=g-import-not-at-top
  for prompt, greedy, sampled in r['samples']:
    metrics.say(f'--- prompt {prompt!r}\n[greedy]  {prompt}{greedy}\n'
                f'[sampled] {prompt}{sampled}')
  half = r['unigram_entropy'] / 2
  verdict = 'below' if r['val_loss'] < half else 'NOT below'
  metrics.say(
      f'Done at step {r["step"]}: val loss {r["val_loss"]:.4f} (ppl {r["val_ppl"]:.2f}), '
      f'{verdict} half the unigram entropy ({half:.3f}). '
      f'Wall time {metrics.format_duration(r["wall_seconds"])}, '
      f'peak memory {r["peak_rss_gib"]:.2f} GiB.')
  if 'val_accuracy' in r:  # An encoder: its loss is on masked tokens only.
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


def parse_flags(argv: list[str]) -> list[str]:
  """Parses flags; a bad flag or override is one clear line, not a traceback."""

  def unknown_key(e: Exception) -> str:
    if not isinstance(e, (KeyError, AttributeError)):
      raise e
    # ml_collections: an override naming a key the config does not have.
    detail = str(e.args[0] if e.args else e)
    key = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", detail)[0] if detail else '?'
    hint = re.search(r'Did you mean "([^"]+)"', detail)
    flag = next((a.split('=')[0] for a in argv if a.startswith('--config.') and
                 re.search(rf'\b{key}\b', a.split('=')[0])), '--config.*')
    return (f'Unknown config key in {flag}: the config has no key {key!r}'
            + (f' (did you mean {hint.group(1)!r}?)' if hint else '')
            + '. configs/base.py declares every key.')

  return cli.parse_flags(argv, on_error=unknown_key)


def load_config():
  """The --config value, or one clear line if the file cannot be loaded."""
  try:
    config = _CONFIG.value
    if config is not None:
      config.keys()  # A file that failed to load raises on first use.
  except (OSError, SyntaxError, AttributeError) as e:
    path = flags.FLAGS['config'].config_filename if 'config' in flags.FLAGS else '?'
    last = str(e).strip().splitlines()[-1].strip()
    cli.fail(f'Cannot load the config file {path!r}: {last}. Pass an existing file '
          'that defines get_config(), e.g. --config=configs/base.py.')
  if config is None:
    cli.fail('No config given. Pass --config=configs/base.py (or another file in configs/).')
  return config


def main(argv) -> None:
  # Library INFO logs (Orbax, absl) would drown the progress line.
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    cli.fail(f'Unexpected arguments: {" ".join(argv[1:])}. Flags look like --config=FILE.')
  config = load_config()
  try:
    from llm_jax import sharding  # pylint: disable=g-import-not-at-top
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                    _PROCESS_ID.value)
    if _DRY_RUN.value or _TOPOLOGY.value:
      from llm_jax import aot  # pylint: disable=g-import-not-at-top
      check_keys(config)
      print(aot.format_report(aot.dry_run(config, _TOPOLOGY.value)), flush=True)
      return
    result = run(config, _WORKDIR.value or None)
  except UserError as e:
    cli.fail(str(e))
  if result.get('stopped_by_signal'):
    sys.exit(128 + result['stopped_by_signal'])



if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
