"""Running a sweep's trials: each one an ordinary training run, pruned by the study.

``run(study_dir, given, config)`` is what ``python -m llm_jax.sweep`` calls.
A worker claims trials (``study.claim``) until the sweep has its trials,
trains each through ``llm_jax.jobs.train.run`` in ``<study>/trials/NNNN``
(its own run directory: generate, evaluate and export work on it), reports
the objective at every evaluation so the pruner can stop it, and prints one
line per finished trial with the best so far.

The objective is the validation loss (or bits per byte) at the end of the
trial's training, ``train.steps``; a pruned trial ends at the evaluation
where the pruner stopped it and counts as pruned, not complete.
"""

import contextlib
import dataclasses
import json
import os
import time
from typing import Any
from collections.abc import Callable

import optuna

from llm_jax.core import files
from llm_jax.core.errors import UserError
from llm_jax.sweeps import report as report_lib
from llm_jax.sweeps import space as space_lib
from llm_jax.sweeps import study as study_lib

TRIAL_FILE = 'trial.json'
LOG_FILE = 'train.log'
MAX_ERRORS_IN_A_ROW = 3  # Then the sweep stops: the config, not the trials, is wrong.
State = optuna.trial.TrialState


@dataclasses.dataclass
class _Outcome:
  """How one trial ended, for the progress line and the summary."""
  number: int
  workdir: str
  state: str  # COMPLETE, PRUNED, FAIL or INTERRUPTED.
  value: float | None
  seconds: float
  error: str = ''
  signal: int | None = None


def run(study_dir: str, given: dict[str, Any], config, *, storage: str = '',
        study_name: str = '', trials: int = 0, log: Callable[[str], None] = print,
        train_fn: Callable[..., dict] | None = None, plots: bool = True) -> dict:
  """Runs trials of the study in ``study_dir`` until the sweep has them all.

  Args:
    study_dir: the study directory (created with the study).
    given: ``study.Settings`` fields (space, sampler, seed, prune, ...; None
      where not given); a new study records them, an existing one checks them.
    config: the resolved base config (a ConfigDict); trials override the
      searched keys.
    storage: a database URL shared by workers; default SQLite in study_dir.
    study_name: the study's name in the storage (default the directory's name).
    trials: trials in the sweep; 0 takes the study's own count.
    log: receives the progress lines.
    train_fn: ``(config, workdir, on_eval=) -> metrics``, default
      ``llm_jax.jobs.train.run`` (tests pass a fake).
    plots: draw the report's PNGs (a few seconds) besides its table.

  Returns:
    {'ran': [trial numbers this worker finished], 'best': best trial or None,
     'report': report path, 'stopped_by_signal': signal number or None}.
  """
  given = {**given, 'config': json.loads(config.to_json()) if config is not None else None}
  study, settings = study_lib.open_study(study_dir, given, storage=storage,
                                         study_name=study_name)
  study.pruner = study_lib.pruner(settings)
  _check_runnable(settings, config)
  if train_fn is None:
    # Here, not at the top: bad flags are refused before JAX and TF load.
    from llm_jax.jobs import train as train_job  # pylint: disable=g-import-not-at-top
    train_fn = train_job.run
  n = settings.trials if settings.sampler == 'grid' or not trials else trials
  outcomes, errors_in_a_row = [], 0
  log(f'Sweep {study.study_name!r} in {study_dir}: {n} trials, {settings.sampler} '
      f'sampler, pruner {settings.prune}, minimising the final {settings.objective}.')
  while (trial := study_lib.claim(study, settings, n, study_dir, log)) is not None:
    outcome = _run_trial(study, trial, settings, config, study_dir, train_fn, log)
    outcomes.append(outcome)
    if outcome.state == 'INTERRUPTED':
      break
    _progress(study, settings, outcome, n, log)
    errors_in_a_row = errors_in_a_row + 1 if outcome.state == 'FAIL' else 0
    if errors_in_a_row >= MAX_ERRORS_IN_A_ROW:
      raise UserError(f'{errors_in_a_row} trials in a row failed; the last: '
                      f'{outcome.error} (see {outcome.workdir}/{LOG_FILE}). Fix the '
                      'config and run the same command again.')
  signal_number = next((o.signal for o in outcomes if o.state == 'INTERRUPTED'), None)
  if signal_number:
    log(f'trial {outcomes[-1].number} stopped by a signal with a checkpoint; run the '
        'same command to resume it and the sweep.')
  result = report_lib.write(study_dir, study, settings, plots=plots)
  log(f'Report: {result["path"]}')
  return {'ran': [o.number for o in outcomes if o.state != 'INTERRUPTED'],
          'best': result['best'], 'report': result['path'],
          'stopped_by_signal': signal_number}


def _check_runnable(settings: study_lib.Settings, config) -> None:
  """Refuses configs under which trials could not give the objective."""
  if settings.prune != 'none' and not config.train.eval_every:
    raise UserError(f'--prune={settings.prune} stops trials at evaluations during '
                    'training, and train.eval_every is 0: set --config.train.eval_every '
                    f'to a divisor of train.steps={config.train.steps}.')
  if config.train.stop_at:
    raise UserError('train.stop_at stops every trial early; set --config.train.stop_at=0 '
                    'for a sweep.')
  if settings.objective == 'val_bpb' and (config.model.kind != 'decoder'
                                          or config.data.source == 'sft'):
    raise UserError('--objective=val_bpb needs a decoder trained on text (not SFT, not '
                    'an encoder); use --objective=val_loss.')


def _trial_config(trial, config, study_dir: str, study_name: str) -> tuple[Any, str]:
  """The trial's config and run directory (written: trial.json, checked)."""
  origin = study_lib.origin(trial)
  workdir = study_lib.trial_dir(study_dir, origin)
  record = {'study': study_name, 'trial': origin, 'params': trial.params}
  path = os.path.join(workdir, TRIAL_FILE)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != record:
      raise UserError(f'{workdir} holds trial {old.get("trial")} of study '
                      f'{old.get("study")!r} with parameters {old.get("params")}, not this '
                      f'trial; move {os.path.join(study_dir, study_lib.TRIALS_DIR)} away '
                      'or pick a new --study.')
  else:
    os.makedirs(workdir, exist_ok=True)
    files.atomic_write_json(path, record)
  return space_lib.apply(config, trial.params), workdir


def _pruning_hook(trial, objective: str) -> Callable[[int, dict], bool]:
  """Reports the objective at each evaluation; True when the pruner says stop."""

  def on_eval(step: int, evals: dict) -> bool:
    trial.report(float(evals[objective]), step)
    return trial.should_prune()

  return on_eval


def _run_trial(study, trial, settings, config, study_dir: str, train_fn,
               log) -> _Outcome:
  """Trains one trial and tells the study how it ended."""
  trial_config, workdir = _trial_config(trial, config, study_dir, study.study_name)
  again = (f' (trial {trial.user_attrs["retry_of"]} again, resuming)'
           if study_lib.is_retry(trial) else '')
  log(f'trial {trial.number}{again}: {space_lib.short(trial.params)}; log '
      f'{os.path.join(workdir, LOG_FILE)}')
  t0 = time.perf_counter()
  try:
    with study_lib.Heartbeat(study, trial), \
        open(os.path.join(workdir, LOG_FILE), 'a') as out, \
        contextlib.redirect_stdout(out):
      result = train_fn(trial_config, workdir,
                        on_eval=_pruning_hook(trial, settings.objective))
  except UserError as e:  # E.g. a diverged loss: this trial's result.
    trial.set_user_attr('error', str(e))
    _tell(study, trial, state=State.FAIL)
    return _Outcome(trial.number, workdir, 'FAIL', None, time.perf_counter() - t0, error=str(e))
  except BaseException:
    study_lib.fail_and_requeue(study, trial, 'stopped by an exception in its worker')
    raise
  seconds = time.perf_counter() - t0
  if result.get('stopped_by_signal'):
    study_lib.fail_and_requeue(study, trial, 'stopped by a signal')
    return _Outcome(trial.number, workdir, 'INTERRUPTED', None, seconds,
                    signal=result['stopped_by_signal'])
  trial.set_user_attr('steps', int(result['step']))
  trial.set_user_attr('wall_seconds', seconds)
  if result.get('stopped_on_eval'):
    _tell(study, trial, state=State.PRUNED)
    return _Outcome(trial.number, workdir, 'PRUNED', result.get(settings.objective), seconds)
  value = float(result[settings.objective])
  _tell(study, trial, values=value)
  return _Outcome(trial.number, workdir, 'COMPLETE', value, seconds)


def _tell(study, trial, **kw) -> None:
  try:
    study.tell(trial, **kw)
  except optuna.exceptions.UpdateFinishedTrialError:
    # Another worker saw no heartbeat and queued it again: its retry finds the
    # finished checkpoint and only evaluates it.
    print(f'warning: trial {trial.number} had already been marked failed by '
          'another worker; its retry will find it finished.', flush=True)


def _progress(study, settings, o: _Outcome, n: int, log) -> None:
  """One line per finished trial: its result and the best so far."""
  done = sum(study_lib.finished(t) for t in study.get_trials(deepcopy=False))
  what = (f'{settings.objective} {o.value:.4f}' if o.value is not None else
          f'error: {o.error}')
  if o.state == 'PRUNED':
    step = study.get_trials(deepcopy=False)[o.number].user_attrs.get('steps')
    what = f'pruned at step {step}' + (f' ({settings.objective} {o.value:.4f})'
                                       if o.value is not None else '')
  try:
    best = study.best_trial
    best_s = f'best so far: trial {best.number}, {settings.objective} {best.value:.4f}'
  except ValueError:
    best_s = 'no complete trial yet'
  log(f'[{done}/{n}] trial {o.number} {o.state.lower()}: {what} in '
      f'{o.seconds:.0f}s | {best_s}')
