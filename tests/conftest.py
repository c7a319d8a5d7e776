"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture
def tiny_config(tmp_path):
  """A factory of configs/tiny.py on 120 documents, cached in tmp (8 devices).

  Overrides are ``section__key=value`` keyword arguments.
  """
  from llm_jax import configuration  # pylint: disable=g-import-not-at-top

  def make(**overrides):
    c = configuration.load_preset('tiny')
    c.data.cache_dir = str(tmp_path / 'cache')
    c.data.max_documents = 120
    c.train.steps = 30
    c.train.eval_every = 0
    c.train.num_samples = 1
    c.optim.warmup_steps = 2  # Runs here are a few steps long.
    for key, value in overrides.items():
      section, name = key.split('__')
      c[section][name] = value
    return c

  return make


def stop_with_signal(proc, line_prefix: str, signum: int) -> tuple[int, str]:
  """Sends ``signum`` once a line starting ``line_prefix`` appears.

  Returns the training step the process says it stopped (and saved) at, and
  its whole output; asserts the documented exit status, 128 + the signal.
  """
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(line_prefix):
      proc.send_signal(signum)
      break
  out = ''.join(lines) + proc.stdout.read()
  assert proc.wait(timeout=120) == 128 + signum, out[-2000:]
  stopped = [l for l in out.splitlines() if l.startswith('Stopped at step')]
  assert stopped, out[-2000:]
  return int(stopped[0].split()[3]), out
