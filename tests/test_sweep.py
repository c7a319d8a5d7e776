"""Sweeps: the space, grid/random/TPE, pruning, workers sharing a study, resume, report.

The fast tests drive the real study and worker code with a stand-in for
``jobs.train.run`` whose loss is a known function of the searched values;
the others train configs/tiny.py for a few steps per trial.
"""

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import optuna
import pytest

from llm_jax import sweep
from llm_jax.core import configuration
from llm_jax.core.errors import UserError
from llm_jax.sweeps import space, study as study_lib, worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
State = optuna.trial.TrialState
LR = 'optim.learning_rate=loguniform(1e-4,1e-2)'
LAYERS = 'model.num_layers=choice(1,2,3)'


# ---- A stand-in trainer: val loss falls to (log10 lr + 2.5)^2 + 0.1 layers + 3.


class FakeTrain:
  """Records every call; reports an eval every train.eval_every steps."""

  def __init__(self):
    self.calls = []

  def __call__(self, config, workdir, on_eval=None):
    lr, layers = config.optim.learning_rate, config.model.num_layers
    final = (math.log10(lr) + 2.5) ** 2 + 0.1 * layers + 3.0
    steps, every = config.train.steps, config.train.eval_every
    self.calls.append((os.path.basename(workdir), lr, layers))
    for step in range(every, steps + 1, every) if every else ():
      value = final + (steps - step) / steps
      if on_eval is not None and on_eval(step, {'val_loss': value}) and step < steps:
        return {'step': step, 'val_loss': value, 'stopped_early': True,
                'stopped_on_eval': True}
    return {'step': steps, 'val_loss': final}


def fake_config(**train):
  c = configuration.load_preset('tiny')
  for k, v in train.items():
    c.train[k] = v
  return c


def given(*specs, **kw):
  return {'space': list(specs) or None, 'config_args': ['--config=configs/tiny.py'], **kw}


def trials_of(study_dir):
  s, _ = study_lib.open_study(str(study_dir), {}, create=False)
  return s.get_trials(deepcopy=False)


# ---- The space.


def test_space_parses_checks_and_applies():
  dims = space.parse_all([LR, 'model.num_layers=int(2,8,2)',
                          "model.norm=choice('rmsnorm','layernorm')",
                          'optim.weight_decay=choice(0,0.1)'])
  assert [d.kind for d in dims] == ['loguniform', 'int', 'choice', 'choice']
  assert dims[0].args == (1e-4, 1e-2)
  assert dims[1].grid_values() == [2, 4, 6, 8]
  assert dims[3].args == (0.0, 0.1)  # An int is fine for a float key.
  c = space.apply(configuration.load_preset('tiny'), {'optim.learning_rate': 3e-3,
                                                      'model.num_layers': 6})
  assert c.optim.learning_rate == 3e-3 and c.model.num_layers == 6
  assert space.override_flags({'optim.learning_rate': 0.1 + 0.2}) == [
      '--config.optim.learning_rate=0.30000000000000004']


@pytest.mark.parametrize('spec, message', [
    ('optim.learnin_rate=loguniform(1e-4,1e-2)',
     "configs/base.py declares no key 'optim.learnin_rate' (did you mean "
     "'optim.learning_rate'?)"),
    ('optim=uniform(0,1)', "'optim' is a section of the config, not a key"),
    ('optim.learning_rate=loguniform(1e-4)', 'loguniform(...) needs two numbers, LOW and HIGH'),
    ('optim.learning_rate=logunif(1e-4,1e-2)',
     "unknown distribution 'logunif' (did you mean 'loguniform'?)"),
    ('optim.learning_rate=loguniform(1e-4,1e-2', 'cannot read the distribution'),
    ('optim.learning_rate=loguniform(0,1e-2)', 'loguniform needs LOW > 0'),
    ('optim.learning_rate=uniform(1e-2,1e-4)', 'LOW must be below HIGH'),
    ('model.num_layers=uniform(1,4)', 'model.num_layers is an integer key'),
    ("model.num_layers=choice(2,'four')", "'four' does not fit model.num_layers"),
    ('model.norm=uniform(0,1)', 'model.norm is str'),
    ('optim.learning_rate', 'write KEY=DISTRIBUTION'),
])
def test_space_refuses_bad_specs(spec, message):
  with pytest.raises(UserError, match=None) as e:
    space.parse_all([spec])
  assert message in str(e.value) and '\n' not in str(e.value)


# ---- Samplers, with the stand-in trainer.


def test_grid_visits_exactly_the_grid(tmp_path):
  fake = FakeTrain()
  worker.run(str(tmp_path / 's'), given('optim.learning_rate=choice(1e-3,3e-3)', LAYERS,
                                        sampler='grid'),
             fake_config(), train_fn=fake, log=lambda _: None,
             plots=False)
  trials = trials_of(tmp_path / 's')
  points = [(t.params['optim.learning_rate'], t.params['model.num_layers']) for t in trials]
  assert sorted(points) == sorted((lr, n) for lr in (1e-3, 3e-3) for n in (1, 2, 3))
  assert len(set(points)) == 6 and all(t.state == State.COMPLETE for t in trials)
  assert [c[0] for c in fake.calls] == [f'{i:04d}' for i in range(6)]
  # Each trial's run directory records its trial and parameters.
  record = json.loads((tmp_path / 's/trials/0004/trial.json').read_text())
  assert record['params'] == trials[4].params
  # A rerun finds nothing left to do.
  worker.run(str(tmp_path / 's'), given(sampler='grid'), fake_config(), train_fn=fake,
             log=lambda _: None)
  assert len(fake.calls) == 6


@pytest.mark.parametrize('sampler', ['random', 'tpe'])
def test_random_and_tpe_are_reproducible_with_a_seed(tmp_path, sampler):
  def sweep_params(name, seed):
    worker.run(str(tmp_path / name), given(LR, LAYERS, sampler=sampler, trials=6, seed=seed),
               fake_config(), trials=6, train_fn=FakeTrain(), log=lambda _: None, plots=False)
    return [tuple(t.params.values()) for t in trials_of(tmp_path / name)]

  first = sweep_params('a', seed=3)
  assert len(first) == 6 and len(set(first)) == 6
  assert sweep_params('b', seed=3) == first
  assert sweep_params('c', seed=4) != first
  if sampler == 'tpe':  # After its 2 random start-up trials TPE heads for lr ~ 3e-3.
    lrs = [p[0] for p in first]
    far = lambda lr: abs(math.log10(lr) + 2.5)
    assert min(map(far, lrs[2:])) < min(map(far, lrs[:2])), lrs


def test_a_dead_workers_trial_is_resumed_not_lost(tmp_path):
  """A RUNNING trial whose process is gone is failed, queued again and rerun in its dir."""
  fake, study_dir = FakeTrain(), str(tmp_path / 's')
  g = given(LR, sampler='random', trials=3, seed=1)
  st, settings = study_lib.open_study(study_dir, {**g, 'config': json.loads(
      fake_config().to_json())})
  trial = study_lib.claim(st, settings, 3, study_dir)  # Then its process "dies":
  gone = subprocess.Popen(['true'])
  gone.wait()
  trial.set_user_attr('worker', {'host': socket.gethostname(), 'pid': gone.pid,
                                 'started': time.time() - 5})
  lines = []
  worker.run(study_dir, g, fake_config(), train_fn=fake, log=lines.append, plots=False)
  trials = trials_of(study_dir)
  assert [t.state for t in trials] == [State.FAIL, State.COMPLETE, State.COMPLETE,
                                       State.COMPLETE]
  assert trials[1].user_attrs['retry_of'] == 0 and trials[1].params == trials[0].params
  assert fake.calls[0][0] == '0000'  # The retry trains in the original's directory.
  assert sum(study_lib.finished(t) for t in trials) == 3
  assert any('trial 0 stopped without finishing' in l for l in lines), lines
  report = (tmp_path / 's/report.md').read_text()
  assert 'ended; resumed as trial 1' in report


def test_a_rerun_must_search_the_same_space(tmp_path):
  study_dir = str(tmp_path / 's')
  worker.run(study_dir, given(LR, sampler='random', trials=1), fake_config(),
             train_fn=FakeTrain(), log=lambda _: None, plots=False)
  with pytest.raises(UserError, match=r"was created with --space='optim.learning_rate="):
    worker.run(study_dir, given(LAYERS, trials=2), fake_config(), train_fn=FakeTrain())
  with pytest.raises(UserError, match=r'differs from the one the study .* optim.b1'):
    c = fake_config()
    c.optim.b1 = 0.8
    worker.run(study_dir, given(trials=2), c, train_fn=FakeTrain())
  # Left out, the recorded space is used; more trials may be asked for.
  worker.run(study_dir, given(), fake_config(), trials=2, train_fn=FakeTrain(),
             log=lambda _: None)
  assert len(trials_of(study_dir)) == 2


# ---- The command: bad input is one line.


def sweep_cli(capsys, *args):
  with pytest.raises(SystemExit) as e:
    sweep.main(list(args))
  err = capsys.readouterr().err.strip()
  return e.value.code, err


@pytest.mark.parametrize('args, message', [
    (['--space=optim.lr=loguniform(1e-4,1e-2)'],
     "configs/base.py declares no key 'optim.lr'"),
    (['--space=optim.learning_rate=loguniform(1e-2,1e-4)'], 'LOW must be below HIGH'),
    (['--space=optim.learning_rate=loguniform(1e-4;1e-2)'], 'cannot read the distribution'),
    ([f'--space={LR}', '--sampler=grid'], '--sampler=grid needs a finite set'),
    ([f'--space={LR}', '--storage=postgresql://sweeper@127.0.0.1:1/none'],
     'Cannot reach the study storage postgresql://sweeper@127.0.0.1:1/none'),
    ([f'--space={LR}', '--storage=nonsense'], "--storage='nonsense' is not a database URL"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, args, message):
  # (--config.* overrides cannot be tested in-process: ml_collections reads
  # them from sys.argv when the flag is defined.)
  code, err = sweep_cli(capsys, '--config=configs/tiny.py', f'--study={tmp_path}/s',
                        '--trials=2', *args)
  assert code == 2 and err.startswith('error: ') and len(err.splitlines()) == 1, err
  assert message in err, err
  assert not os.path.exists(tmp_path / 's' / study_lib.MARKER)


def test_pruning_needs_evaluations_during_training(tmp_path):
  with pytest.raises(UserError, match='--prune=median stops trials at evaluations during'):
    worker.run(str(tmp_path / 's'), given(LR, sampler='random', trials=2, prune='median'),
               fake_config(eval_every=0), train_fn=FakeTrain())


def test_a_study_directory_that_is_not_ours_is_refused(tmp_path, capsys):
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'config.json').write_text('{}')
  code, err = sweep_cli(capsys, '--config=configs/tiny.py', f'--study={tmp_path}/run',
                        f'--space={LR}', '--trials=2')
  assert code == 2 and 'is not a sweep study' in err, err
  assert os.listdir(tmp_path / 'run') == ['config.json']


# ---- Real training on configs/tiny.py.


@pytest.fixture(scope='module')
def tiny_cache(tmp_path_factory):
  """A token cache for the tiny config on 120 documents, built once."""
  from llm_jax.data import shards  # pylint: disable=g-import-not-at-top
  cache = str(tmp_path_factory.mktemp('cache'))
  shards.prepare(tiny(cache), log=lambda *_: None)
  return cache


def tiny(cache, **train):
  c = configuration.load_preset('tiny')
  c.data.cache_dir, c.data.max_documents = cache, 120
  # No peak-FLOP/s matmul per trial, few eval batches, saves only at the end.
  c.train.update(dict(steps=6, eval_every=3, num_samples=0, log_every=3, eval_batches=2,
                      peak_flops=1e11, **train))
  c.optim.warmup_steps = 2
  c.checkpoint.every = 0
  return c


@pytest.mark.slow
def test_a_real_sweep_trains_prunes_and_reports(tmp_path, tiny_cache):
  """lr 3e-3 and 1e-2 finish; 1e-5 is worse at step 3 than their median and stops."""
  study_dir, lines = str(tmp_path / 's'), []
  result = worker.run(study_dir, given('optim.learning_rate=choice(3e-3,1e-2,1e-5)',
                                       sampler='grid', prune='median'),
                      tiny(tiny_cache), log=lines.append)
  trials = trials_of(study_dir)
  assert [t.state for t in trials] == [State.COMPLETE, State.COMPLETE, State.PRUNED], lines
  pruned = trials[2]
  assert pruned.user_attrs['steps'] == 3 and list(pruned.intermediate_values) == [3]
  # The good learning rates learnt something; the pruned trial had not.
  assert max(t.value for t in trials[:2]) < pruned.intermediate_values[3] - 0.2
  assert result['best']['number'] == min(trials[:2], key=lambda t: t.value).number
  assert any(l.startswith('[3/3] trial 2 pruned: pruned at step 3') for l in lines), lines
  # Each trial is an ordinary run: its config and a checkpoint where it stopped.
  config = json.loads((tmp_path / 's/trials/0002/config.json').read_text())
  assert config['optim']['learning_rate'] == 1e-5
  assert (tmp_path / 's/trials/0002/checkpoints/3').is_dir()
  report = (tmp_path / 's/report.md').read_text()
  assert '| 2 | 1e-05 | (' in report and 'PRUNED' in report
  assert result['best']['command'] in report and '--config.optim.learning_rate=' in report
  for png in ('history', 'learning_curves', 'slice'):
    assert (tmp_path / 's' / f'{png}.png').stat().st_size > 5000


# ---- Workers in processes: two on one study, SIGKILL and resume.


def cli_args(cache, study_dir, *extra):
  return [sys.executable, '-m', 'llm_jax.sweep', '--config=configs/tiny.py',
          f'--study={study_dir}', f'--config.data.cache_dir={cache}',
          '--config.data.max_documents=120', '--config.train.num_samples=0',
          '--config.optim.warmup_steps=2', '--config.train.eval_every=0',
          '--config.train.eval_batches=2', '--config.train.peak_flops=1e11', *extra]


def start(args):
  env = {**os.environ, 'XLA_FLAGS': ''}
  return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def two_workers(args, n):
  procs = [start(args) for _ in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  ran = [{int(n) for n in re.findall(r'^\[\d+/\d+\] trial (\d+) ', out, re.M)}
         for out in outs]
  assert not ran[0] & ran[1], outs  # No trial finished by both.
  assert len(ran[0] | ran[1]) == n, outs
  return outs


def assert_each_trial_trained_once(study_dir, n):
  trials = trials_of(study_dir)
  assert [t.state for t in trials] == [State.COMPLETE] * n
  for t in trials:  # One training run in each trial's directory.
    log = open(os.path.join(study_dir, 'trials', f'{t.number:04d}', 'train.log')).read()
    assert log.count('Training steps 1..') == 1, log


@pytest.mark.slow
def test_two_workers_share_a_sqlite_study(tmp_path, tiny_cache):
  study_dir = str(tmp_path / 's')
  two_workers(cli_args(tiny_cache, study_dir, f'--space={LR}', '--sampler=random',
                       '--trials=4', '--config.train.steps=3'), 4)
  assert_each_trial_trained_once(study_dir, 4)


def _postgres_bin(name):
  found = shutil.which(name)
  if found:
    return found
  versions = sorted(os.listdir('/usr/lib/postgresql')) if os.path.isdir(
      '/usr/lib/postgresql') else []
  return next((f'/usr/lib/postgresql/{v}/bin/{name}' for v in reversed(versions)
               if os.path.exists(f'/usr/lib/postgresql/{v}/bin/{name}')), None)


@pytest.fixture
def postgres_url():
  """A throw-away PostgreSQL server on 127.0.0.1 (Debian's package), stopped after."""
  pytest.importorskip('psycopg')
  initdb, pg_ctl = _postgres_bin('initdb'), _postgres_bin('pg_ctl')
  if not (initdb and pg_ctl):
    pytest.skip('PostgreSQL is not installed (apt-get install -y postgresql)')
  as_user = []
  root = tempfile.mkdtemp(prefix='llmjax-pg-')
  if os.geteuid() == 0:  # The server refuses to run as root.
    if not shutil.which('runuser'):
      pytest.skip('running as root without runuser to start PostgreSQL as postgres')
    as_user = ['runuser', '-u', 'postgres', '--']
    shutil.chown(root, 'postgres')
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  data = os.path.join(root, 'data')
  run = lambda *a: subprocess.run([*as_user, *a], check=True, capture_output=True,
                                  timeout=120)
  try:
    run(initdb, '-D', data, '-U', 'sweeper', '-A', 'trust')
    run(pg_ctl, '-D', data, '-l', os.path.join(root, 'log'), '-w', '-t', '60', '-o',
        f'-h 127.0.0.1 -p {port} -k {root}', 'start')
    yield f'postgresql://sweeper@127.0.0.1:{port}/postgres'
  finally:
    if os.path.exists(os.path.join(data, 'postmaster.pid')):
      subprocess.run([*as_user, pg_ctl, '-D', data, '-m', 'immediate', '-w', 'stop'],
                     capture_output=True, timeout=60)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study(tmp_path, tiny_cache, postgres_url):
  study_dir = str(tmp_path / 's')
  two_workers(cli_args(tiny_cache, study_dir, f'--space={LR}', '--sampler=tpe',
                       '--trials=4', '--config.train.steps=3',
                       f'--storage={postgres_url}'), 4)
  assert not os.path.exists(os.path.join(study_dir, study_lib.DB_FILE))
  assert_each_trial_trained_once(study_dir, 4)
  # The report needs only the study directory (study.json names the storage).
  code = subprocess.run([sys.executable, '-m', 'llm_jax.sweep', f'--study={study_dir}',
                         '--report'], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert code.returncode == 0 and '4 complete' in code.stdout, code.stderr


@pytest.mark.slow
def test_sigkill_mid_trial_then_rerun_resumes(tmp_path, tiny_cache):
  study_dir = str(tmp_path / 's')
  args = cli_args(tiny_cache, study_dir, f'--space={LR}', '--sampler=random', '--trials=3',
                  '--config.train.steps=40', '--config.checkpoint.every=5')
  proc = start(args)
  first_ckpt = os.path.join(study_dir, 'trials', '0001', 'checkpoints', '10')
  deadline = time.monotonic() + 400
  while not os.path.isdir(first_ckpt) and proc.poll() is None:
    assert time.monotonic() < deadline, 'trial 1 never saved step 10'
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)  # Mid-trial 1: trial 0 is done.
  out = proc.communicate(timeout=60)[0]
  assert proc.returncode == -signal.SIGKILL, out
  rerun = subprocess.run(args, cwd=ROOT, env={**os.environ, 'XLA_FLAGS': ''},
                         capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
  trials = trials_of(study_dir)
  assert [t.state for t in trials] == [State.COMPLETE, State.FAIL, State.COMPLETE,
                                       State.COMPLETE]
  assert trials[2].user_attrs['retry_of'] == 1 and trials[2].params == trials[1].params
  log = open(os.path.join(study_dir, 'trials', '0001', 'train.log')).read()
  assert 'Resuming from the checkpoint at step' in log, log[-2000:]
  assert 'trial 1 stopped without finishing' in rerun.stdout
  assert 'trial 2 (trial 1 again, resuming)' in rerun.stdout
