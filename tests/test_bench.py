"""python -m llm_jax.bench: each subcommand prints a Markdown table and writes JSON."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config=configs/tiny.py', '--config.mesh.data=1']


def bench(*args, devices: int = 1):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  proc = subprocess.run([sys.executable, '-m', 'llm_jax.bench', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, env=env)
  return proc.returncode, proc.stdout, proc.stderr.strip()


def test_train_reports_step_time_mfu_and_memory(tmp_path):
  out = tmp_path / 'train.json'
  code, stdout, err = bench('train', *TINY, '--steps=3', '--warmup=1', f'--out={out}')
  assert code == 0, err[-2000:]
  assert '| **MFU**' in stdout and 'PaLM 6N + attention' in stdout, stdout
  r = json.loads(out.read_text())
  assert r['steps_timed'] == 3 and len(r['peak_flops_samples']) == 3
  assert r['flops_per_token'] == 1_081_344  # 6 * 163,840 + 12 * 2 * 4 * 16 * 64.
  assert 0 < r['mfu'] < 1.5 and r['tokens_per_sec'] > 0 and r['compile_seconds'] > 0
  assert r['peak_rss_bytes'] > 0 and r['compiled_temp_bytes'] > 0


@pytest.mark.slow
def test_checkpoint_reports_bytes_per_second(tmp_path):
  out = tmp_path / 'ckpt.json'
  code, stdout, err = bench('checkpoint', *TINY, '--steps=4', '--save_every=2',
                            '--warmup=1', f'--out={out}', f'--dir={tmp_path}/c')
  assert code == 0, err[-2000:]
  r = json.loads(out.read_text())
  assert r['saves_timed'] == 2 and r['save_bytes_per_sec'] > 0
  assert r['restore_bytes_per_sec'] > 0 and r['async_block_seconds_median'] >= 0
  assert '| async save holds the loop' in stdout


@pytest.mark.slow
def test_data_pipeline_outpaces_the_step(tmp_path):
  out = tmp_path / 'data.json'
  code, stdout, err = bench('data', *TINY, f'--config.data.cache_dir={tmp_path}/cache',
                            '--steps=4', '--warmup=1', f'--out={out}')
  assert code == 0, err[-2000:]
  r = json.loads(out.read_text())
  assert r['pipeline_batches_per_sec'] > 0 and r['headroom'] > 1, r


@pytest.mark.parametrize('args, message', [
    (['nope'], "Unknown subcommand 'nope': use one of train, data, checkpoint, decode"),
    (['train', '--config=configs/tiny.py', '--steps=0'], '--steps=0'),
])
def test_bad_input_is_one_clear_line(args, message):
  code, _, err = bench(*args)
  assert code == 2, err
  assert err.splitlines()[-1].startswith('error: ') and message in err, err


def test_decode_needs_a_run():
  code, _, err = bench('decode')
  assert code == 2 and 'needs --workdir' in err, err


@pytest.mark.slow  # 10-25 s on 2 cores; runs in CI with the full suite.
def test_train_runs_where_tensorflow_is_not_installed(tmp_path):
  """The GPU machine has no TensorFlow: `bench train` must not import it."""
  out = tmp_path / 'train.json'
  argv = ['llm_jax.bench', 'train', *TINY, '--steps=1', '--warmup=0', f'--out={out}']
  code = ("import runpy, sys; sys.modules['tensorflow'] = None\n"
          f"sys.argv = {argv!r}\n"
          "try:\n  runpy.run_module('llm_jax.bench', run_name='__main__')\n"
          "except SystemExit as e:\n  assert not e.code, e.code\n"
          "assert not [m for m in sys.modules if m.startswith('tensorflow') and sys.modules[m]]\n")
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                        text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(out.read_text())['steps_timed'] == 1
