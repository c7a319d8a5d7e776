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
    c.train.num_samples = 0  # Sampling compiles generate (3-8 s); tests that read samples ask.
    c.train.peak_flops = 1e11  # Skips the start-up matmul measurement (about 1 s).
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


@pytest.fixture(scope='session')
def go_build(tmp_path_factory):
  """serving/go built by its build.sh: {'bin': dir, 'build_sh': path, 'env': env}.

  One build per session serves tests/test_go.py and tests/test_go_server.py;
  ``env`` points GOCACHE at the build's cache, so ``build.sh --test`` reuses it.
  Skips without Go.
  """
  import shutil  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  if shutil.which('go') is None:
    pytest.skip('Go is not installed (apt-get install golang-go); serving/go is not built')
  go_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'serving', 'go')
  build = dict(bin=os.path.join(go_dir, 'bin'), build_sh=os.path.join(go_dir, 'build.sh'),
               env={**os.environ, 'GOCACHE': str(tmp_path_factory.mktemp('gocache'))})
  proc = subprocess.run(['bash', build['build_sh'], sys.executable], capture_output=True,
                        text=True, timeout=600, env=build['env'])
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return build


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
def _run_quietly(*args) -> bool:
  import subprocess  # pylint: disable=g-import-not-at-top
  return subprocess.run(args, capture_output=True, check=False).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
  """A factory: ``small_disk(megabytes)`` mounts a tmpfs of that size and returns it.

  Needs root (CAP_SYS_ADMIN), which CI has; the test is skipped elsewhere.
  """
  mounts = []

  def make(megabytes: int):
    path = tmp_path / f'disk{len(mounts)}'
    path.mkdir()
    if not _run_quietly('mount', '-t', 'tmpfs', '-o', f'size={megabytes}m', 'tmpfs',
                        str(path)):
      pytest.skip('cannot mount a small tmpfs here (needs root)')
    mounts.append(path)
    return path

  yield make
  for path in mounts:
    _run_quietly('umount', '-l', str(path))


@pytest.fixture
def read_only(tmp_path):
  """A factory: ``read_only(path)`` makes a directory unwritable for this process.

  Not root: chmod 0555. Root ignores permissions, so the directory is bound
  read-only onto itself instead (skipped where that is not allowed).
  """
  undo = []

  def make(path):
    path = str(path)
    if os.geteuid() != 0:
      os.chmod(path, 0o555)
      undo.append(lambda: os.chmod(path, 0o755))
    elif _run_quietly('mount', '--bind', path, path):
      undo.append(lambda: _run_quietly('umount', '-l', path))
      if not _run_quietly('mount', '-o', 'remount,bind,ro', path):
        pytest.skip('cannot make a directory read-only for root here')
    else:
      pytest.skip('cannot make a directory read-only for root here')

  yield make
  for fn in reversed(undo):
    fn()


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
