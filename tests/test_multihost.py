"""Two processes x 4 CPU devices (gloo) train exactly like one process x 8 devices."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One process of the job: joins through jax.distributed, trains, prints results.
WORKER = r'''
import hashlib, json, sys
from llm_jax.core import configuration
from llm_jax.training import sharding
from llm_jax import train
from llm_jax.data import pipeline
coordinator, n, i, workdir, cache, steps, mesh = sys.argv[1:8]
rows, real = [], pipeline.train_batches
def spy(*args, **kwargs):  # Hashes of the training rows this host reads.
  for batch in real(*args, **kwargs):
    rows.extend(hashlib.sha256(r.tobytes()).hexdigest() for r in batch['inputs'])
    yield batch
pipeline.train_batches = spy
if int(n) > 1:
  sharding.initialize_distributed(coordinator, int(n), int(i))
c = configuration.load_preset('tiny')
c.data.cache_dir, c.data.max_documents = cache, 120
c.train.steps, c.train.eval_every, c.train.num_samples = int(steps), 0, 1
c.train.log_every, c.checkpoint.every, c.optim.warmup_steps = 1, 3, 2
c.mesh.data, c.mesh.fsdp, c.mesh.tensor = map(int, mesh.split('x'))
r = train.run(c, workdir)
import jax
print('RESULT ' + json.dumps({'process': jax.process_index(), 'step': r['step'],
      'losses': r['loss_history'], 'val_loss': r['val_loss'], 'rows': rows}), flush=True)
'''


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(num_processes, devices_per_process, workdir, cache, steps, mesh):
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices_per_process}',
         'JAX_PLATFORMS': 'cpu'}
  coordinator = f'127.0.0.1:{free_port()}'
  procs = [subprocess.Popen(
      [sys.executable, '-c', WORKER, coordinator, str(num_processes), str(i),
       str(workdir), str(cache), str(steps), mesh],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(num_processes)]
  results = []
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    line = [l for l in out.splitlines() if l.startswith('RESULT ')][-1]
    results.append((json.loads(line[len('RESULT '):]), out))
  return results


@pytest.mark.slow
def test_two_processes_match_one_and_checkpoints_move_between_them(tmp_path):
  cache = tmp_path / 'cache'
  [(one, _)] = launch(1, 8, tmp_path / 'one', cache, 6, '8x1x1')
  two = launch(2, 4, tmp_path / 'two', cache, 6, '2x4x1')
  for r, _ in two:
    assert r['step'] == 6
    for step, loss in one['losses'].items():
      assert abs(r['losses'][step] - loss) <= 1e-5 * abs(loss), (step, r, one)
    assert abs(r['val_loss'] - one['val_loss']) <= 1e-5 * one['val_loss']
  assert 'step 6/6' in two[0][1] and 'step 6/6' not in two[1][1], 'only process 0 logs'
  # The hosts read disjoint rows that together are the one-host batches.
  rows0, rows1 = set(two[0][0]['rows']), set(two[1][0]['rows'])
  assert rows0 and not rows0 & rows1 and rows0 | rows1 == set(one['rows'])

  # A checkpoint written by two processes resumes in one, and the other way round.
  [(resumed, out)] = launch(1, 8, tmp_path / 'two', cache, 9, '1x8x1')
  assert 'Resuming from the checkpoint at step 6' in out and resumed['step'] == 9
  back = launch(2, 4, tmp_path / 'one', cache, 9, '2x2x2')
  assert all(r['step'] == 9 for r, _ in back)
  assert 'Resuming from the checkpoint at step 6' in back[0][1]
