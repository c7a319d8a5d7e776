"""A sweep's Optuna study: its storage, its record, and which trial runs next.

A study lives in a *study directory* (``--study``): ``study.json`` (its name
and storage, marking the directory as ours), ``study.db`` (the SQLite storage,
unless ``--storage`` names a PostgreSQL/MySQL database that workers on many
machines share), ``sweep.lock`` and ``trials/NNNN/``, one ordinary run
directory per trial.

The study records its settings (search space, sampler, seed, pruner,
objective, trial count and the resolved base config) when it is created;
every later worker is checked against them, so several processes and reruns
search the same space.

Who runs what, with any number of workers:

* The first ``trials`` trials that are not retries are the sweep; a trial
  asked beyond them (two workers asking at once) is marked failed with
  ``surplus`` and never runs. Grid sweeps queue every grid point when the
  study is created, so workers only take points from the queue.
* A trial whose process died is marked failed and queued again with the same
  parameters (``retry_of`` names the original); the retry trains in the
  original's directory, so it resumes from its last checkpoint. Death is
  seen at once for processes on this host (their pid is gone) and through
  Optuna's heartbeat for other hosts (no heartbeat for ``GRACE_S`` seconds).
* On one host the claim (reconcile, ask, check) holds a file lock in the
  study directory: SQLite has no row locks, and two workers must not take
  the same queued trial. PostgreSQL/MySQL lock the rows themselves.
"""

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import socket
import threading
import time
import warnings
from typing import Any

import numpy as np
import optuna
import psutil

from llm_jax.core import files
from llm_jax.core.errors import UserError
from llm_jax.sweeps import space as space_lib

MARKER = 'study.json'
DB_FILE = 'study.db'
LOCK_FILE = 'sweep.lock'
TRIALS_DIR = 'trials'
SETTINGS_ATTR = 'llm_jax_sweep'
HEARTBEAT_S = 10  # A running trial records a heartbeat this often...
GRACE_S = 120  # ...and counts as dead after this long without one.
SAMPLERS = ('grid', 'random', 'tpe')
PRUNERS = ('none', 'median')
OBJECTIVES = ('val_loss', 'val_bpb')
_CREATE_WAIT_S = 60  # How long a worker waits for another to finish creating.

optuna.logging.set_verbosity(optuna.logging.WARNING)


@contextlib.contextmanager
def _quiet():
  """Heartbeats are 'experimental', and Optuna expects them only in Study.optimize
  (workers here ask and tell themselves and run the heartbeat)."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings('ignore', message='Heartbeat of storage is supposed')
    yield


@dataclasses.dataclass
class Settings:
  """What a study searches and how; recorded in the study when it is created."""
  space: list[str]  # 'KEY=DISTRIBUTION' lines (see sweeps/space.py).
  sampler: str = 'tpe'  # One of SAMPLERS.
  trials: int = 0  # Trials in the sweep (grid: the grid's size).
  seed: int = 0  # Seeds the sampler (trial k samples with seed + k).
  prune: str = 'none'  # One of PRUNERS.
  prune_startup: int = 2  # Trials that finish before the pruner may stop one.
  prune_warmup: int = 0  # Training steps before a trial may be stopped.
  objective: str = 'val_loss'  # The final validation metric minimised.
  config_args: list[str] = dataclasses.field(default_factory=list)  # --config flags.
  config: dict = dataclasses.field(default_factory=dict)  # The resolved base config.

  def dims(self) -> list[space_lib.Dimension]:
    return space_lib.parse_all(self.space)


def trial_dir(study_dir: str, origin: int) -> str:
  """The run directory of a trial (retries share their original's)."""
  return os.path.join(study_dir, TRIALS_DIR, f'{origin:04d}')


def origin(trial) -> int:
  """The number of the trial a retry repeats (its own number otherwise)."""
  return trial.user_attrs.get('retry_of', trial.number)


def is_retry(trial) -> bool:
  return 'retry_of' in trial.user_attrs


def finished(trial) -> bool:
  """Whether the trial is a result of the sweep: complete, pruned or errored."""
  s = trial.state
  return (s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
          or (s == optuna.trial.TrialState.FAIL and 'error' in trial.user_attrs))


# ---- Storage.


def masked(url: str) -> str:
  """The URL with its password hidden, for messages and study.json."""
  import sqlalchemy  # pylint: disable=g-import-not-at-top  (optuna's dependency)
  try:
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
  except Exception:  # pylint: disable=broad-except
    return url.split('@')[-1]


def _engine_kwargs(url: str) -> dict:
  """Bounded waits: a busy SQLite file or an unreachable server fails in time."""
  if url.startswith('sqlite'):
    return {'connect_args': {'timeout': 60}}
  if url.startswith(('postgresql', 'mysql')):
    return {'connect_args': {'connect_timeout': 10}, 'pool_pre_ping': True}
  return {}


def open_storage(url: str) -> optuna.storages.RDBStorage:
  """The RDB storage at ``url``, with heartbeats; UserError if it cannot be used."""
  import sqlalchemy  # pylint: disable=g-import-not-at-top
  try:
    sqlalchemy.engine.make_url(url)
  except sqlalchemy.exc.ArgumentError:
    raise UserError(f'--storage={url!r} is not a database URL; use e.g. '
                    'postgresql://USER:PASSWORD@HOST/DB, mysql+pymysql://... or '
                    'sqlite:///PATH.db (default: study.db in the study directory).') from None
  try:
    with _quiet():
      return optuna.storages.RDBStorage(
          url, engine_kwargs=_engine_kwargs(url), heartbeat_interval=HEARTBEAT_S,
          grace_period=GRACE_S, heartbeat_stale_trial_callback=_requeue_stale)
  except ImportError:
    raise UserError(f'The study storage {masked(url)} needs a database driver that '
                    f'is not installed; pip install "psycopg[binary]" for postgresql://, '
                    'PyMySQL for mysql+pymysql://.') from None
  except Exception as e:  # pylint: disable=broad-except
    first = (str(getattr(e, 'orig', None) or e).strip().splitlines() or [''])[0][:200]
    raise UserError(f'Cannot reach the study storage {masked(url)}: {first}. Check '
                    'the URL and that the database server runs and accepts this '
                    'machine.') from None


@contextlib.contextmanager
def locked(study_dir: str):
  """Holds the study directory's lock (one claim at a time on this host)."""
  with open(os.path.join(study_dir, LOCK_FILE), 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _check_study_dir(study_dir: str) -> dict | None:
  """The directory's study.json, None if new; UserError if it is not a study."""
  marker = os.path.join(study_dir, MARKER)
  if os.path.isfile(marker):
    with open(marker) as f:
      return json.load(f)
  # A lock or a database file alone: a creation that stopped before study.json.
  if os.path.isfile(study_dir) or (os.path.isdir(study_dir) and
                                   set(os.listdir(study_dir)) - {LOCK_FILE, DB_FILE}):
    raise UserError(f'{study_dir} exists and is not a sweep study (it has no {MARKER}); '
                    'pick a new --study directory.')
  return None


def _storage_url(study_dir: str, storage: str, marker: dict | None) -> str:
  if storage:
    return storage
  recorded = (marker or {}).get('storage', '')
  if recorded and '***' in recorded:
    raise UserError(f'The study in {study_dir} is stored at {recorded}; pass '
                    '--storage=URL with its password (it is not written to disk).')
  return recorded or f'sqlite:///{os.path.join(study_dir, DB_FILE)}'


# ---- Opening or creating a study.


def _differences(given: dict, recorded: dict, prefix: str = '') -> list[str]:
  """Dotted keys where two nested dicts differ."""
  out = []
  for key in sorted(set(given) | set(recorded)):
    a, b = given.get(key), recorded.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _differences(a, b, f'{prefix}{key}.')
    elif a != b:
      out.append(f'{prefix}{key} (study {b!r}, here {a!r})')
  return out


def _resolve(given: dict[str, Any], recorded: Settings, study_dir: str) -> Settings:
  """The recorded settings, after checking that what was given agrees."""
  for name, value in given.items():
    if value in (None, []) or name in ('trials', 'config_args'):
      continue  # Another worker may run more trials; flag spellings may differ.
    if name == 'config':
      diff = _differences(value, recorded.config)
      if diff:
        raise UserError(f'This config differs from the one the study in {study_dir} '
                        f'was created with: {"; ".join(diff[:3])}. Pass the study\'s '
                        f'config: {" ".join(recorded.config_args)}.')
    elif value != getattr(recorded, name):
      flag = 'space' if name == 'space' else name
      shown = ' '.join(f'--space={s!r}' for s in recorded.space) if name == 'space' \
          else f'--{flag}={getattr(recorded, name)}'
      raise UserError(f'The study in {study_dir} was created with {shown}, not '
                      f'{value!r}; leave --{flag} out (or repeat it) to continue it, '
                      'or pick a new --study.')
  if given.get('config') is None:
    raise UserError(f'Pass the config to run trials of the study in {study_dir}: '
                    f'{" ".join(recorded.config_args)}.')
  return recorded


def _new_settings(given: dict[str, Any]) -> Settings:
  """Settings of a new study from what was given; UserError if incomplete."""
  if not given.get('space'):
    raise UserError('A new study needs its search space: pass one '
                    "--space='KEY=DISTRIBUTION' per searched key, e.g. "
                    "--space='optim.learning_rate=loguniform(1e-4,1e-2)'.")
  if given.get('config') is None:
    raise UserError('A new study needs a config: pass --config=configs/tiny.py (or '
                    'another file in configs/).')
  settings = Settings(**{k: v for k, v in given.items() if v is not None})
  dims = settings.dims()
  if settings.sampler not in SAMPLERS:
    raise UserError(f'--sampler={settings.sampler!r}: use one of {", ".join(SAMPLERS)}.')
  if settings.sampler == 'grid':
    size = len(space_lib.grid(dims))
    if settings.trials not in (0, size):
      raise UserError(f'--sampler=grid runs the whole grid, {size} points; leave '
                      f'--trials out (or pass --trials={size}).')
    settings.trials = size
  elif settings.trials < 1:
    raise UserError(f'--sampler={settings.sampler} needs --trials=N (N >= 1).')
  return settings


def open_study(study_dir: str, given: dict[str, Any], *, storage: str = '',
               study_name: str = '', create: bool = True
               ) -> tuple[optuna.Study, Settings]:
  """Loads the study in ``study_dir`` (creating it if ``create``) and its settings.

  Args:
    study_dir: the study directory.
    given: Settings fields the caller was given (None: not given).
    storage: a database URL; default the study's own (SQLite in study_dir).
    study_name: the study's name in the storage; default the directory's name.
    create: create the study if it does not exist yet.
  """
  study_dir = os.path.abspath(study_dir)
  if given.get('space'):  # Checked (and spelt one way) before anything is written.
    given = {**given, 'space': [d.spec for d in space_lib.parse_all(given['space'])]}
  marker = _check_study_dir(study_dir)
  if marker is None and not create:
    raise UserError(f'{study_dir} holds no study; run a sweep there first.')
  name = study_name or (marker or {}).get('study_name') or os.path.basename(study_dir)
  url = _storage_url(study_dir, storage, marker)
  # A new study's settings are checked before anything is written.
  new = _new_settings(given) if marker is None and given.get('space') else None
  os.makedirs(study_dir, exist_ok=True)
  with locked(study_dir):
    store = open_storage(url)
    try:
      study = optuna.load_study(study_name=name, storage=store)
    except KeyError:
      if not create:
        raise UserError(f'The storage {masked(url)} has no study named {name!r}.') from None
      study = _create(store, name, new or _new_settings(given))
    if marker is None:
      own = url == _storage_url(study_dir, '', None)
      files.atomic_write_json(os.path.join(study_dir, MARKER), {
          'study_name': name, 'storage': '' if own else masked(url)})
  recorded = _wait_for_settings(study)
  if not create:
    return study, recorded
  return study, _resolve(given, recorded, study_dir)


def _create(store, name: str, settings: Settings) -> optuna.Study:
  """Creates the study, queues a grid's points, then records the settings."""
  try:
    study = optuna.create_study(study_name=name, storage=store, direction='minimize')
  except optuna.exceptions.DuplicatedStudyError:
    return optuna.load_study(study_name=name, storage=store)  # Another machine won.
  if settings.sampler == 'grid':
    for point in space_lib.grid(settings.dims()):
      study.enqueue_trial(point)
  # Last: a worker that finds the settings finds the grid queued too.
  study.set_user_attr(SETTINGS_ATTR, dataclasses.asdict(settings))
  return study


def _wait_for_settings(study: optuna.Study) -> Settings:
  """The recorded settings (another worker may be creating the study now)."""
  deadline = time.monotonic() + _CREATE_WAIT_S
  while True:
    record = study.user_attrs.get(SETTINGS_ATTR)
    if record is not None:
      return Settings(**record)
    if time.monotonic() > deadline:
      raise UserError(f'The study {study.study_name!r} exists but was not made by '
                      'llm_jax.sweep (it records no settings); pick another --study.')
    time.sleep(1)


# ---- Samplers and pruners.


def sampler(settings: Settings, offset: int) -> optuna.samplers.BaseSampler:
  """The sampler for the next trial, seeded from (seed, number of trials so far).

  A fresh sampler per trial, seeded by the number of trials so far, makes a
  sweep that was killed and resumed ask what an uninterrupted one would.
  (SeedSequence mixes the pair: nearby integer seeds would give nearby first
  draws.) Grid points are queued when the study is created; the random
  sampler is only a formality there.
  """
  seed = int(np.random.SeedSequence([settings.seed, offset]).generate_state(1)[0])
  if settings.sampler == 'tpe':
    startup = min(10, max(2, settings.trials // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
  return optuna.samplers.RandomSampler(seed=seed)


def pruner(settings: Settings) -> optuna.pruners.BasePruner:
  if settings.prune == 'median':
    return optuna.pruners.MedianPruner(n_startup_trials=settings.prune_startup,
                                       n_warmup_steps=settings.prune_warmup)
  return optuna.pruners.NopPruner()


# ---- Workers: claiming a trial, noticing dead ones.


def _me() -> dict:
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': psutil.Process().create_time()}


def _alive(worker: dict) -> bool:
  """Whether the process a trial names (on this host) still runs."""
  try:
    p = psutil.Process(worker['pid'])
    return (abs(p.create_time() - worker['started']) < 1.0
            and p.status() != psutil.STATUS_ZOMBIE)
  except psutil.Error:
    return False


def requeue(study: optuna.Study, trial, why: str) -> None:
  """Queues a failed trial again: same parameters, its reports, ``retry_of``."""
  study.add_trial(optuna.trial.create_trial(
      state=optuna.trial.TrialState.WAITING, params=trial.params,
      distributions=trial.distributions, intermediate_values=trial.intermediate_values,
      user_attrs={'retry_of': origin(trial), 'retry_after': trial.number, 'why': why}))


def _requeue_stale(study: optuna.Study, trial) -> None:
  """Optuna's callback for a trial whose heartbeat stopped (failed already)."""
  requeue(study, trial, f'no heartbeat for {GRACE_S} s')


def fail_and_requeue(study: optuna.Study, trial, why: str) -> bool:
  """Marks a running trial failed and queues it again; False if it had ended."""
  try:
    if not study._storage.set_trial_state_values(  # pylint: disable=protected-access
        trial._trial_id, optuna.trial.TrialState.FAIL):  # pylint: disable=protected-access
      return False
  except optuna.exceptions.UpdateFinishedTrialError:
    return False  # Another worker got there first.
  requeue(study, study._storage.get_trial(trial._trial_id), why)  # pylint: disable=protected-access
  return True


def reconcile(study: optuna.Study) -> list[int]:
  """Fails and requeues trials whose process died; returns their numbers."""
  running = lambda: {t.number for t in study.get_trials(
      deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
  before = running()
  with _quiet():
    optuna.storages.fail_stale_trials(study)  # Heartbeats: workers on any host.
  me = _me()
  for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
    w = t.user_attrs.get('worker')
    if w and w['host'] == me['host'] and not _alive(w):
      fail_and_requeue(study, t, f'its process (pid {w["pid"]}) ended')
  retried = {t.user_attrs['retry_after'] for t in study.get_trials(deepcopy=False)
             if 'retry_after' in t.user_attrs}
  return sorted((before - running()) & retried)


def claim(study: optuna.Study, settings: Settings, n_trials: int, study_dir: str,
          log=logging.info) -> optuna.Trial | None:
  """The next trial for this worker, its parameters chosen; None when none is left."""
  dims = settings.dims()
  with locked(study_dir):
    for number in reconcile(study):
      log(f'trial {number} stopped without finishing (its worker died); queued again '
          'to resume from its last checkpoint.')
    while True:
      trials = study.get_trials(deepcopy=False)
      originals = sum(not is_retry(t) for t in trials)
      waiting = any(t.state == optuna.trial.TrialState.WAITING for t in trials)
      if originals >= n_trials and not waiting:
        return None
      study.sampler = sampler(settings, len(trials))
      with _quiet():
        trial = study.ask()
      study._storage.record_heartbeat(trial._trial_id)  # pylint: disable=protected-access
      trial.set_user_attr('worker', _me())
      if not is_retry(trial) and _index(study, trial) >= n_trials:
        trial.set_user_attr('surplus', True)  # Asked at the same time as another.
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        continue
      for d in dims:
        d.suggest(trial)
      return trial


def _index(study: optuna.Study, trial) -> int:
  """How many trials that are not retries come before this one."""
  return sum(not is_retry(t) for t in study.get_trials(deepcopy=False)
             if t.number < trial.number)


class Heartbeat:
  """Records a running trial's heartbeat every HEARTBEAT_S seconds, in a thread."""

  def __init__(self, study: optuna.Study, trial):
    self._storage, self._id = study._storage, trial._trial_id  # pylint: disable=protected-access
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, daemon=True)

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_S):
      try:
        self._storage.record_heartbeat(self._id)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Could not record the trial heartbeat: %s', e)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
