"""Runs you can trust: exact resume, signals, torn checkpoints, NaN, refusals."""

import glob
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax._src.compilation_cache import compress_executable, decompress_executable

from conftest import stop_with_signal
from llm_jax import train
from llm_jax.data import pipeline
from llm_jax.core.errors import UserError
from llm_jax.runs import workdir as workdir_lib
from llm_jax.training import xla_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_checkpoint(path):
  """A checkpoint's arrays as numpy, restored without any model code."""
  with ocp.StandardCheckpointer() as ckpt:
    return jax.tree.map(np.asarray, ckpt.restore(os.path.join(path, 'state')))


def assert_trees_bit_equal(a, b):
  """Same structure, dtypes and bits in every leaf (chex names the first that differs)."""
  chex.assert_trees_all_equal_structs(a, b)
  chex.assert_trees_all_equal_dtypes(a, b)
  chex.assert_trees_all_equal(a, b, strict=True)


def cli(workdir, cache, *overrides, popen=False):
  args = [sys.executable, '-m', 'llm_jax.train', '--config=configs/tiny.py',
          f'--workdir={workdir}', f'--config.data.cache_dir={cache}',
          '--config.data.max_documents=120', '--config.train.steps=40',
          '--config.train.log_every=1', '--config.checkpoint.every=100',
          '--config.train.num_samples=0',
          '--config.train.peak_flops=1e11',  # Skips the start-up matmul measurement.
          *overrides]
  env = {**os.environ, 'XLA_FLAGS': ''}
  if popen:
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


@pytest.mark.slow
def test_sigterm_then_resume_is_bit_exact(tmp_path):
  """Straight to step 12, against SIGTERM at a step >= 4 and a new process resuming."""
  cache = tmp_path / 'cache'
  straight = cli(tmp_path / 'a', cache, '--config.train.stop_at=12')
  assert straight.returncode == 0, straight.stderr[-2000:]

  proc = cli(tmp_path / 'b', cache, popen=True)
  stopped, _ = stop_with_signal(proc, 'step  4/40', signal.SIGTERM)
  assert 4 <= stopped < 12
  assert os.path.isdir(tmp_path / 'b' / 'checkpoints' / str(stopped))

  resumed = cli(tmp_path / 'b', cache, '--config.train.stop_at=12')
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f'Resuming from the checkpoint at step {stopped}' in resumed.stdout
  # Every step's loss, as TensorBoard recorded it (float32, exact).
  assert tb_losses(tmp_path / 'a') == tb_losses(tmp_path / 'b')
  assert len(tb_losses(tmp_path / 'a')) == 12
  # Params, optimizer state, step and RNG: equal bit for bit.
  assert_trees_bit_equal(read_checkpoint(tmp_path / 'a' / 'checkpoints' / '12'),
                         read_checkpoint(tmp_path / 'b' / 'checkpoints' / '12'))


# A stopped run exits this soon after it says its checkpoint is saved (it
# used to wait up to ~30 s in the input pipeline's teardown now and then).
EXIT_SECONDS = 10


@pytest.mark.slow
def test_sigterm_exits_promptly_and_resumably_every_time(tmp_path):
  """Five SIGTERMs in a row to one run: each exits 143 soon after its save."""
  cache, workdir = tmp_path / 'cache', tmp_path / 'run'
  saved, waits = 0, []
  for attempt in range(5):
    proc = cli(workdir, cache, '--config.train.steps=100000', popen=True)
    lines, steps_seen, stopped_at = [], 0, None
    for line in proc.stdout:
      lines.append(line)
      if re.match(r'step +\d+/', line):
        steps_seen += 1
        if steps_seen == 2 + attempt % 3:  # A different moment each time.
          proc.send_signal(signal.SIGTERM)
      if line.startswith('Stopped at step'):
        stopped_at = time.monotonic()
        break
    out = ''.join(lines) + proc.stdout.read()  # Returns at the process's exit.
    waits.append(time.monotonic() - stopped_at if stopped_at else float('inf'))
    assert proc.wait(timeout=60) == 143, out[-3000:]
    assert waits[-1] < EXIT_SECONDS, (attempt, waits, out[-2000:])
    if saved:
      assert f'Resuming from the checkpoint at step {saved}' in out, out[-3000:]
    step = int(re.search(r'Stopped at step (\d+)', out).group(1))
    assert step > saved and (workdir / 'checkpoints' / str(step) /
                             'commit_success.txt').exists()
    saved = step


def tb_losses(workdir) -> dict:
  from llm_jax.core.tfhost import tf  # pylint: disable=g-import-not-at-top
  losses = {}
  for path in glob.glob(str(workdir / 'tb' / 'events.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == 'loss':
          losses[event.step] = tf.make_ndarray(value.tensor).item()
  return losses


def record_batches(monkeypatch, poison=()):
  """Hashes of every training batch the loop takes; targets out of range at ``poison``."""
  hashes = []
  real = pipeline.train_batches

  def spy(windows, *, start_step, **kwargs):
    for step, batch in enumerate(real(windows, start_step=start_step, **kwargs),
                                 start=start_step + 1):
      if step in poison:  # A corrupt shard: ids past the vocabulary give NaN.
        batch = {**batch, 'targets': np.full_like(batch['targets'], 10**6)}
      hashes.append(hashlib.sha256(batch['inputs'].tobytes()).hexdigest())
      yield batch

  monkeypatch.setattr(pipeline, 'train_batches', spy)
  return hashes


def test_resume_sees_exactly_the_uninterrupted_batches(tmp_path, tiny_config, monkeypatch):
  hashes = record_batches(monkeypatch)
  straight = train.run(tiny_config(train__steps=12), str(tmp_path / 'a'))
  straight_hashes = list(hashes)
  hashes.clear()
  first = train.run(tiny_config(train__steps=12, train__stop_at=5),
                    str(tmp_path / 'b'))
  assert first['stopped_early'] and first['step'] == 5
  # The same command again does nothing more: stop_at is a place, not a count.
  assert train.run(tiny_config(train__steps=12, train__stop_at=5), str(tmp_path / 'b'))['step'] == 5
  second = train.run(tiny_config(train__steps=12), str(tmp_path / 'b'))
  assert second['step'] == 12
  assert hashes == straight_hashes and len(set(hashes)) == 12, 'a batch repeated or skipped'
  assert {**first['loss_history'], **second['loss_history']} == straight['loss_history']


@pytest.mark.slow  # 10-25 s on 2 cores; runs in CI with the full suite.
def test_on_eval_can_stop_the_run_with_a_checkpoint(tmp_path, tiny_config):
  """The loop's hook for callers (a sweep's pruner) sees each eval and may stop there."""
  config, workdir, seen = tiny_config(train__steps=8, train__eval_every=2), str(tmp_path), []

  def on_eval(step, evals):
    seen.append((step, evals['val_loss']))
    return step >= 4

  result = train.run(config, workdir, on_eval=on_eval)
  assert [s for s, _ in seen] == [2, 4]  # Not the eval before training; none after 4.
  assert result['stopped_early'] and result['stopped_on_eval'] and result['step'] == 4
  assert result['val_loss'] == seen[-1][1]
  assert (tmp_path / 'checkpoints' / '4').is_dir()
  assert train.run(config, workdir, on_eval=on_eval)['step'] == 6  # Resumed, stopped again.
  # The last eval is seen too, and asking to stop there changes nothing.
  result = train.run(config, workdir, on_eval=on_eval)
  assert [s for s, _ in seen] == [2, 4, 6, 8]
  assert result['step'] == 8 and not result['stopped_on_eval']


@pytest.mark.slow  # 10-25 s on 2 cores; runs in CI with the full suite.
def test_two_fresh_runs_give_identical_losses(tmp_path, tiny_config):
  a = train.run(tiny_config(train__steps=6), str(tmp_path / 'a'))
  b = train.run(tiny_config(train__steps=6), str(tmp_path / 'b'))
  assert a['loss_history'] == b['loss_history'] and len(a['loss_history']) == 6


@pytest.mark.slow  # 40-50 s on 2 cores; runs in CI with the full suite.
def test_compiled_steps_stay_in_their_own_run_and_a_restart_reuses_them(tmp_path, tiny_config):
  """<workdir>/xla_cache: the run's own, even for a second run in the same process."""
  hits = []

  def listen(event, **_):
    if event == '/jax/compilation_cache/cache_hits':
      hits.append(event)

  def entries(run):
    return sorted(os.listdir(xla_cache.directory(str(tmp_path / run))))

  before = jax.config.jax_compilation_cache_dir
  threshold = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)  # Tiny steps compile fast.
  jax.monitoring.register_event_listener(listen)
  try:
    config = tiny_config(train__steps=4, train__compile_cache=True, train__num_samples=0)
    config.train.stop_at = 2
    train.run(config, str(tmp_path / 'a'))
    first = entries('a')
    assert [e for e in first if e.startswith('jit_train_step-')], first
    # A second run in this process keeps its steps in its own directory.
    train.run(tiny_config(train__steps=3, train__compile_cache=True, train__num_samples=0),
              str(tmp_path / 'b'))
    assert [e for e in entries('b') if e.startswith('jit_train_step-')], entries('b')
    assert entries('a') == first
    assert jax.config.jax_compilation_cache_dir == before  # The caller's cache is back.
    # A start killed while JAX wrote an entry leaves it cut off (JAX writes in place).
    step_entry = xla_cache.directory(str(tmp_path / 'a')) + '/' + next(
        e for e in first if e.startswith('jit_train_step-') and e.endswith('-cache'))
    whole = open(step_entry, 'rb').read()
    with open(step_entry, 'wb') as f:
      f.write(whole[:len(whole) // 2])
    hits.clear()
    config.train.stop_at = 0
    assert train.run(config, str(tmp_path / 'a'))['step'] == 4  # The restart...
    assert hits and entries('a') == first  # ...compiled nothing new but the torn step,
    assert decompress_executable(open(step_entry, 'rb').read())  # which is whole again.
  finally:
    jax.monitoring.unregister_event_listener(listen)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', threshold)


def test_a_compiled_step_cut_off_while_written_is_removed_and_the_rest_kept(tmp_path):
  """JAX never replaces an entry; a torn one would be read, fail, and be compiled at every start."""
  entry = compress_executable(b'a compiled step ' * 1000)
  for name, data in (('whole', entry), ('torn', entry[:len(entry) // 3])):
    (tmp_path / f'{name}-cache').write_bytes(data)
    (tmp_path / f'{name}-atime').write_bytes(b'12345678')
  assert xla_cache.drop_torn(str(tmp_path)) == ['torn-cache']
  assert sorted(os.listdir(tmp_path)) == ['whole-atime', 'whole-cache']
  assert xla_cache.drop_torn(str(tmp_path / 'not-there')) == []


def make_checkpoints(tmp_path, tiny_config):
  config = tiny_config(train__steps=6, checkpoint__every=2, checkpoint__keep=3)
  train.run(config, str(tmp_path / 'run'))
  return config, tmp_path / 'run' / 'checkpoints'


@pytest.mark.parametrize('damage', ['truncate', 'no_marker'])
def test_torn_latest_checkpoint_falls_back_with_a_warning(tmp_path, tiny_config, caplog, damage):
  config, ckpts = make_checkpoints(tmp_path, tiny_config)
  if damage == 'truncate':
    for path in glob.glob(str(ckpts / '6' / 'state' / 'ocdbt.process_0' / 'd' / '*')):
      with open(path, 'r+b') as f:
        f.truncate(10)
  else:
    os.remove(ckpts / '6' / 'commit_success.txt')
  config.train.steps = 8
  result = train.run(config, str(tmp_path / 'run'))
  assert result['step'] == 8 and 0 not in result['val_history']
  assert 'step 6' in caplog.text and str(ckpts) in caplog.text, caplog.text
  assert min(result['loss_history']) == 5, 'did not resume from step 4'


@pytest.mark.slow  # 10-25 s on 2 cores; runs in CI with the full suite.
def test_unfinished_save_is_ignored_with_a_warning(tmp_path, tiny_config, caplog):
  config, ckpts = make_checkpoints(tmp_path, tiny_config)
  leftover = ckpts / '8.orbax-checkpoint-tmp-1234'
  leftover.mkdir()
  (leftover / 'partial').write_bytes(b'\0' * 10)
  config.train.steps = 7
  assert train.run(config, str(tmp_path / 'run'))['step'] == 7
  assert '8.orbax-checkpoint-tmp-1234' in caplog.text


@pytest.mark.slow  # 10-25 s on 2 cores; runs in CI with the full suite.
def test_no_readable_checkpoint_is_an_error_not_a_restart(tmp_path, tiny_config):
  config, ckpts = make_checkpoints(tmp_path, tiny_config)
  for step in ('2', '4', '6'):
    os.remove(ckpts / step / 'commit_success.txt')
  with pytest.raises(UserError, match='No checkpoint in .* could be read'):
    train.run(config, str(tmp_path / 'run'))


def test_finished_run_changes_nothing(tmp_path, tiny_config, capsys):
  config, ckpts = make_checkpoints(tmp_path, tiny_config)
  before = sorted((p, os.path.getmtime(p)) for p in glob.glob(str(ckpts / '**'), recursive=True))
  result = train.run(config, str(tmp_path / 'run'))
  assert result['step'] == 6 and result['val_bpb'] > 0  # Scored like a finished run.
  assert 'Training is already complete' in capsys.readouterr().out
  after = sorted((p, os.path.getmtime(p)) for p in glob.glob(str(ckpts / '**'), recursive=True))
  assert before == after


def test_checkpoint_path_that_is_a_file_fails_at_once(tmp_path, tiny_config):
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'checkpoints').write_text('not a directory')
  with pytest.raises(UserError, match='Cannot create the checkpoint directory'):
    train.run(tiny_config(), str(tmp_path / 'run'))


@pytest.mark.slow  # 10-25 s on 2 cores; runs in CI with the full suite.
def test_changed_data_is_refused_and_changed_lr_is_logged(tmp_path, tiny_config, caplog):
  config, _ = make_checkpoints(tmp_path, tiny_config)
  config.train.steps, config.optim.learning_rate = 7, 1e-3
  train.run(config, str(tmp_path / 'run'))
  assert 'optim.learning_rate: 0.005 -> 0.001' in caplog.text
  config.data.max_documents = 100
  with pytest.raises(UserError, match=r'another training data \(content hash\)'):
    train.run(config, str(tmp_path / 'run'))


def test_nan_halt_stops_before_the_update(tmp_path, tiny_config, monkeypatch):
  record_batches(monkeypatch, poison={5})
  config = tiny_config(train__steps=8, checkpoint__every=2)
  with pytest.raises(UserError, match='Training stopped at step 5: loss nan'):
    train.run(config, str(tmp_path / 'run'))
  ckpts = tmp_path / 'run' / 'checkpoints'
  assert sorted(os.listdir(ckpts)) == ['2', '4']
  params = read_checkpoint(ckpts / '4')['params']
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.slow  # 10-25 s on 2 cores; runs in CI with the full suite.
def test_nan_skip_drops_the_update_and_halts_after_a_streak(tmp_path, tiny_config, monkeypatch):
  record_batches(monkeypatch, poison={3})
  config = tiny_config(train__steps=5, train__nan_policy='skip', checkpoint__every=1,
                       checkpoint__keep=10)
  result = train.run(config, str(tmp_path / 'a'))
  assert result['step'] == 5 and result['nan_skipped'] == 1
  ckpts = tmp_path / 'a' / 'checkpoints'
  before, after = read_checkpoint(ckpts / '2'), read_checkpoint(ckpts / '3')
  assert_trees_bit_equal(before['params'], after['params'])
  assert_trees_bit_equal(before['opt_state'], after['opt_state'])
  assert not np.array_equal(*(jax.tree.leaves(read_checkpoint(ckpts / s)['params'])[0]
                              for s in ('3', '4')))

  record_batches(monkeypatch, poison={2, 3, 4, 5})
  config = tiny_config(train__steps=8, train__nan_policy='skip', train__max_nan_skips=3)
  with pytest.raises(UserError, match=r'step 5: .*4 in a row, train.max_nan_skips=3'):
    train.run(config, str(tmp_path / 'b'))


@pytest.mark.slow
def test_sigkill_during_async_saves_resumes_from_a_whole_checkpoint(tmp_path):
  """kill -9 while a save is likely in flight (one every step): no torn resume."""
  cache, ckpts = tmp_path / 'cache', tmp_path / 'run' / 'checkpoints'
  proc = cli(tmp_path / 'run', cache, '--config.checkpoint.every=1',
             '--config.checkpoint.keep=3', popen=True)
  for line in proc.stdout:
    if line.startswith('step 15/40'):
      proc.kill()
      break
  proc.wait(timeout=60)
  leftovers = [p for p in os.listdir(ckpts) if 'orbax-checkpoint-tmp' in p]
  rerun = cli(tmp_path / 'run', cache, '--config.train.stop_at=20')
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  resumed = re.search(r'Resuming from the checkpoint at step (\d+)', rerun.stdout)
  assert resumed and 10 <= int(resumed.group(1)) <= 16, rerun.stdout[-2000:]
  for name in leftovers:  # Each unfinished save is named, then ignored.
    assert name in rerun.stderr, (name, rerun.stderr[-2000:])


@pytest.mark.slow  # 10-25 s on 2 cores; runs in CI with the full suite.
def test_checkpoint_directory_lost_mid_run_fails_at_once(tmp_path):
  """The volume under checkpoints/ goes away (or turns read-only) mid-run."""
  workdir, ckpts = tmp_path / 'run', tmp_path / 'run' / 'checkpoints'
  proc = cli(workdir, tmp_path / 'cache', '--config.train.steps=5000',
             '--config.checkpoint.every=5', popen=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith('step') and (ckpts / '5' / 'commit_success.txt').exists():
      break
  if os.geteuid() == 0:
    # Root ignores permissions: the directory vanishes and a file takes its
    # place, as when a mounted volume drops out.
    moved = tmp_path / 'run' / 'checkpoints.lost'
    ckpts.rename(moved)
    ckpts.write_text('')
  else:
    moved = ckpts
    ckpts.chmod(0o555)
  try:  # Exits at once: not after Orbax's 300 s wait for the failed save's signals.
    after, _ = proc.communicate(timeout=90)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail('The run did not exit within 90 s of losing its checkpoint '
                'directory: ' + proc.communicate()[0][-2000:])
  if moved == ckpts:
    ckpts.chmod(0o755)
  out = ''.join(lines) + after
  assert proc.returncode == 2, out[-3000:]
  # After the loss: training lines, then one error line and nothing else (no
  # Orbax warnings, asyncio echoes or tracebacks of TensorStore's threads).
  said = [l for l in after.splitlines() if not l.startswith('step')]
  assert len(said) == 1 and said[0].startswith('error: Cannot write the checkpoint'), (
      after[-3000:])
  errors = said
  saved = int(re.search(r'step (\d+), is untouched', errors[0]).group(1))
  assert saved >= 5 and saved % 5 == 0
  # The checkpoint the message names is whole and loads.
  assert (moved / str(saved) / 'commit_success.txt').exists()
  state = read_checkpoint(str(moved / str(saved)))
  assert int(state['step']) == saved
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params']))


def test_a_second_trainer_is_refused_while_the_first_holds_the_run(tmp_path, tiny_config):
  """The lock train.run takes; tests/test_files.py shows kill -9 frees it, and
  test_kill_9_at_random_moments_changes_nothing restarts killed trainers."""
  run = tmp_path / 'run'
  run.mkdir()
  with workdir_lib.training_lock(str(run)):  # The first trainer, still running.
    with pytest.raises(UserError, match=f'in use by another training process: pid '
                       f'{os.getpid()} on {re.escape(socket.gethostname())}, started '):
      train.run(tiny_config(), str(run))
    assert os.listdir(run) == ['train.lock'], 'the second trainer wrote into the run'
  with workdir_lib.training_lock(str(run)):  # Once the first is done, the run is free.
    pass


@pytest.mark.slow  # 10-25 s on 2 cores; runs in CI with the full suite.
def test_lost_checkpoints_are_refused_not_silently_restarted(tmp_path, tiny_config, capsys):
  config, ckpts = make_checkpoints(tmp_path, tiny_config)
  shutil.rmtree(ckpts)  # Deleted by hand, or a volume that was not mounted.
  tb = tmp_path / 'run' / 'tb'
  before = sorted(os.listdir(tb))
  config_json = (tmp_path / 'run' / 'config.json').read_bytes()
  with pytest.raises(UserError, match=r'trained before \(TensorBoard has its curve up to '
                     r'step 6\) but .* holds no checkpoint.*allow_fresh_start=True'):
    train.run(config, str(tmp_path / 'run'))
  assert sorted(os.listdir(tb)) == before and not ckpts.exists()
  assert (tmp_path / 'run' / 'config.json').read_bytes() == config_json
  config.train.allow_fresh_start = True
  result = train.run(config, str(tmp_path / 'run'))
  assert result['step'] == 6 and 0 in result['val_history']
  (old,) = [p for p in os.listdir(tmp_path / 'run') if p.startswith('tb.before-')]
  assert sorted(os.listdir(tmp_path / 'run' / old)) == before
  assert f'are now in {tmp_path / "run" / old}' in capsys.readouterr().out


def test_a_full_disk_is_one_line_without_orbax_tracebacks(tmp_path, tiny_config, small_disk,
                                                           caplog):
  disk = small_disk(4)  # One 2.7 MB checkpoint of the tiny model fits, two do not.
  config = tiny_config(train__steps=40, checkpoint__every=5, checkpoint__keep=3,
                       train__compile_cache=False, train__num_samples=0,
                       train__peak_flops=1e11)
  with pytest.raises(UserError, match=r'Cannot write the checkpoint of step \d+ .*: no space '
                     r'left on the device .*The newest complete checkpoint, step 5, is '
                     'untouched'):
    train.run(config, str(disk / 'run'))
  orbax = [r for r in caplog.records if '/orbax/' in r.pathname and r.levelno >= 40]
  assert not orbax, [r.getMessage()[:200] for r in orbax]
  assert (disk / 'run' / 'checkpoints' / '5' / 'commit_success.txt').exists()


def _kill_after(proc, step_lines: int, ckpts, *, mid_save: bool, delay: float) -> str:
  """kill -9 once ``step_lines`` progress lines are out and a checkpoint is whole.

  With ``mid_save``, waits for a save in flight (Orbax's temporary directory)
  and kills during it. Returns what the process printed.
  """
  lines, seen = [], 0
  for line in proc.stdout:
    lines.append(line)
    seen += bool(re.match(r'step +\d+/', line))
    if seen >= step_lines and any(p.joinpath('commit_success.txt').exists()
                                  for p in ckpts.glob('[0-9]*')):
      break
  deadline = time.monotonic() + 5
  while mid_save and time.monotonic() < deadline and not any(
      'orbax-checkpoint-tmp' in p.name for p in ckpts.iterdir()):
    time.sleep(0.001)
  time.sleep(delay)
  if mid_save:
    assert any('orbax-checkpoint-tmp' in p.name for p in ckpts.iterdir()), 'no save in flight'
  proc.kill()
  proc.wait(timeout=60)
  return ''.join(lines)


@pytest.mark.slow
def test_kill_9_at_random_moments_changes_nothing(tmp_path):
  """Three kill -9s (one during a save, every step saving), then a rerun to the
  end: params, Adam moments, step and RNG equal an uninterrupted run's, bit for bit."""
  cache, steps = tmp_path / 'cache', 30
  common = (f'--config.train.steps={steps}', '--config.checkpoint.every=1',
            '--config.checkpoint.keep=2')
  straight = cli(tmp_path / 'a', cache, *common)
  assert straight.returncode == 0, straight.stderr[-2000:]
  rng = random.Random(19)  # Random moments, the same ones on every run of the test.
  run = tmp_path / 'b'
  for attempt in range(3):
    proc = cli(run, cache, *common, popen=True)
    out = _kill_after(proc, rng.randint(2, 6), run / 'checkpoints', mid_save=attempt == 0,
                      delay=0 if attempt == 0 else rng.uniform(0, 0.1))
    if attempt:
      assert 'Resuming from the checkpoint at step' in out, out[-2000:]
  final = cli(run, cache, *common)
  assert final.returncode == 0, final.stderr[-3000:]
  resumed = int(re.search(r'Resuming from the checkpoint at step (\d+)', final.stdout)[1])
  assert 0 < resumed < steps, final.stdout[-2000:]
  chex.assert_trees_all_equal(workdir_lib.load_state(str(tmp_path / 'a'), steps),
                              workdir_lib.load_state(str(run), steps))
