"""The main command on a tiny config: the loss falls, reruns resume, Ctrl-C saves."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest

from conftest import stop_with_signal
from llm_jax import train
from llm_jax.core.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_thirty_steps_lower_validation_loss(tmp_path, tiny_config):
  config = tiny_config(train__num_samples=1, train__peak_flops=0.0)  # Both as a user runs.
  workdir = tmp_path / 'run'
  result = train.run(config, str(workdir))
  vocab = result['vocab_size']
  # At init the loss is about ln(vocab); 30 steps must take off a clear margin.
  assert result['val_history'][0] == pytest.approx(math.log(vocab), abs=0.3)
  assert result['val_loss'] < result['val_history'][0] - 1.0, result['val_history']
  assert result['step'] == 30
  assert math.isfinite(result['tokens_per_sec']) and result['tokens_per_sec'] > 0
  assert math.isfinite(result['mfu']) and result['mfu'] > 0  # Against the peak measured now.
  assert (workdir / 'checkpoints' / '30').is_dir()
  assert json.loads((workdir / 'config.json').read_text())['train']['steps'] == 30
  assert os.listdir(workdir / 'tb'), 'TensorBoard events missing'
  prompt, greedy, sampled = result['samples'][0]
  assert isinstance(greedy, str) and isinstance(sampled, str)

  # The same command again: complete, nothing retrained.
  again = train.run(config, str(workdir))
  assert again['step'] == 30
  assert again['val_loss'] == pytest.approx(result['val_loss'], rel=1e-6)

  # A longer run on the same workdir resumes at 30 instead of starting over.
  config.train.steps = 40
  longer = train.run(config, str(workdir))
  assert longer['step'] == 40 and 0 not in longer['val_history']


def test_resume_refuses_a_different_model(tmp_path, tiny_config):
  config = tiny_config(train__steps=2, optim__warmup_steps=1)
  train.run(config, str(tmp_path / 'run'))
  config.model.d_model = 96
  with pytest.raises(UserError, match=r'model.d_model=64 but this run has model.d_model=96'):
    train.run(config, str(tmp_path / 'run'))


def test_empty_corpus_after_cleaning(tmp_path, tiny_config):
  (tmp_path / 'docs').mkdir()
  (tmp_path / 'docs' / 'a.txt').write_text('too short')
  config = tiny_config(data__source='text', data__paths=str(tmp_path / 'docs' / '*.txt'))
  with pytest.raises(UserError, match='no documents left after cleaning'):
    train.run(config, str(tmp_path / 'run'))


@pytest.mark.slow
def test_ctrl_c_saves_and_rerun_resumes(tmp_path):
  args = [sys.executable, '-m', 'llm_jax.train', '--config=configs/tiny.py',
          f'--workdir={tmp_path}/run', f'--config.data.cache_dir={tmp_path}/cache',
          '--config.data.max_documents=120', '--config.train.steps=400',
          '--config.train.log_every=1', '--config.checkpoint.every=1000']
  env = {**os.environ, 'XLA_FLAGS': ''}
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  step, _ = stop_with_signal(proc, 'step  20/400', signal.SIGINT)
  assert 20 <= step < 400
  assert os.path.isdir(f'{tmp_path}/run/checkpoints/{step}')

  rerun = subprocess.run(args[:-3] + ['--config.train.steps=' + str(step + 5)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  assert f'Resuming from the checkpoint at step {step}' in rerun.stdout
  assert f'Done at step {step + 5}' in rerun.stdout


@pytest.mark.parametrize('section, key, value, message', [
    ('train', 'batch_size', 0, r'train.batch_size=0 must be an integer of at least 1'),
    ('train', 'steps', 0, r'train.steps=0 must be an integer of at least 1'),
    ('train', 'steps', -5, r'train.steps=-5 must be an integer of at least 1'),
    ('train', 'eval_batches', 0, r'train.eval_batches=0 must be'),
    ('optim', 'warmup_steps', 30, r'optim.warmup_steps=30 must be .* below train.steps=30'),
    ('model', 'num_kv_heads', 3, r'model.num_heads=4 is not a multiple of model.num_kv_heads=3'),
])
def test_bad_values_fail_before_anything_is_created(tmp_path, tiny_config, section, key,
                                                    value, message):
  config = tiny_config()
  config[section][key] = value
  with pytest.raises(UserError, match=message):
    train.run(config, str(tmp_path / 'run'))
  assert not os.listdir(tmp_path), 'the run directory (or the data cache) was created'


def test_a_run_directory_that_cannot_be_written_is_one_line(tmp_path, tiny_config, read_only):
  run = tmp_path / 'run'
  (run / 'checkpoints').mkdir(parents=True)
  (run / 'config.json').write_text('{}')  # A run to resume.
  read_only(run)
  with pytest.raises(UserError, match=f'Cannot write to the run directory {run}'):
    train.run(tiny_config(), str(run))
