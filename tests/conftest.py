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
  from llm_jax.core import configuration  # pylint: disable=g-import-not-at-top

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


@pytest.fixture(scope='session')
def exported_tiny_run(tmp_path_factory):
  """(run, SavedModel dir, export info): a 20-step tiny run exported once.

  Shared by tests/test_export.py and tests/test_go.py (output width 12, batch
  buckets 1 and 3, lowered for cpu, cuda and tpu).
  """
  from llm_jax.core import configuration  # pylint: disable=g-import-not-at-top
  from llm_jax.deploy import saved_model as export  # pylint: disable=g-import-not-at-top
  from llm_jax import train  # pylint: disable=g-import-not-at-top
  from llm_jax.runs import workdir  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('export')
  c = configuration.load_preset('tiny')
  c.data.cache_dir = str(root / 'cache')
  c.data.max_documents = 120
  c.train.steps = 20
  c.train.eval_every = 0
  c.train.num_samples = 0
  c.optim.warmup_steps = 2
  c.checkpoint.every = 20
  train.run(c, str(root / 'run'))
  out = str(root / 'saved' / '1')
  info = export.export(str(root / 'run'), out, max_new_tokens=12,
                       batch_buckets=(1, 3), log=lambda *_: None)
  return workdir.load(str(root / 'run')), out, info


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


@pytest.fixture
def command_status():
  """Runs a command's ``main(args)`` in this process; returns its exit status."""

  def run(main, args: list[str]) -> int:
    try:
      main(args)
    except SystemExit as e:
      return e.code
    return 0

  return run


@pytest.fixture(scope='session')
def colour_sft_run(tmp_path_factory):
  """The workdir of the tiny model SFT'd on noisy colour answers (tests/colours.py).

  40% of the SFT answers name the wrong colour, so the model prefers the
  right one only somewhat: room for a reward model, DPO and GRPO to show
  what they add. 150 steps of 16 x 64 tokens (about 90 s on 2 cores).
  """
  import colours  # pylint: disable=g-import-not-at-top
  from llm_jax.core import configuration  # pylint: disable=g-import-not-at-top
  from llm_jax import train  # pylint: disable=g-import-not-at-top
  from llm_jax.data import shards  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('colours')
  tiny = configuration.load_preset('tiny')
  tiny.data.cache_dir = str(root / 'cache')
  tiny.data.max_documents = 120
  tokenizer = shards.prepare(tiny, log=lambda *_: None).tokenizer
  c = configuration.load_preset('sft')
  c.model = tiny.model
  c.data.update(paths=colours.write_sft(root / 'sft.jsonl', n=400, noise=0.4),
                seq_len=64, val_fraction=0.1, cache_dir=tiny.data.cache_dir)
  c.tokenizer.path = tokenizer.path
  c.optim.update(learning_rate=3e-3, warmup_steps=5)
  c.train.update(steps=150, batch_size=16, eval_every=0, eval_batches=4, num_samples=0)
  c.checkpoint.every = 150
  train.run(c, str(root / 'sft'))
  return str(root / 'sft')
