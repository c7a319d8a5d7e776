"""launch/: the scripts that start llm_jax.train on every host of a multi-host job.

Nothing is started: the scripts run with --dry-run (they print their commands),
or against stand-ins for gcloud / xpk / sbatch / srun that only record the
arguments they were given. Both must agree, and the train flags must reach
llm_jax.train word for word, including ones with spaces and quotes.
"""

import os
import shlex
import shutil
import stat
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch')
SCRIPTS = ['tpu_vm.sh', 'gke_xpk.sh', 'slurm.sh', 'slurm.sbatch']
TOOLS = ['gcloud', 'xpk', 'sbatch', 'srun', 'scontrol']
# Settings the scripts read from the environment; cleared so the host's own
# environment cannot change what the tests see.
SETTINGS = ['TPU_NAME', 'ZONE', 'PROJECT', 'REPO_DIR', 'REPO_URL', 'REPO_REF',
            'LLM_JAX_PYTHON', 'LLM_JAX_REQUEUE', 'CLUSTER', 'WORKLOAD', 'TPU_TYPE',
            'DOCKER_IMAGE', 'NUM_SLICES', 'APP_DIR', 'DRY_RUN', 'JAX_LOCAL_DEVICE_IDS',
            'SRUN_CPUS_PER_TASK']

TRAIN_ARGS = ['--config=configs/base.py', '--workdir=gs://my-bucket/runs/base',
              "--config.data.paths=my corpus/it's *.txt", '--config.train.steps=1000']
TPU = ['--tpu=my-v5p', '--zone=us-east5-a', '--project=my-project']
XPK = ['--cluster=my-cluster', '--workload=llm-base', '--tpu-type=v5p-128',
       '--num-slices=2', '--docker-image=us-docker.pkg.dev/my-project/llm/llm_jax:v1']
ALLOCATION = {'SLURM_JOB_ID': '4242', 'SLURM_JOB_NUM_NODES': '8',
              'SLURM_CPUS_ON_NODE': '96', 'SLURM_GPUS_ON_NODE': '8'}


@pytest.fixture
def tools(tmp_path):
  """Stand-ins for the cluster tools: each appends its argv to a log."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for tool in TOOLS:
    path = bin_dir / tool
    path.write_text('#!/usr/bin/env bash\n'
                    'printf "%s\\0" "$(basename "$0")" "$@" >> "$TOOL_LOG"\n'
                    'printf "\\n" >> "$TOOL_LOG"\n'
                    'status="STUB_EXIT_$(basename "$0")"\n'
                    'exit "${!status:-0}"\n')
    path.chmod(0o755)
  return bin_dir, tmp_path / 'calls.log'


def calls(log):
  """The recorded invocations, each as its argv list."""
  if not log.exists():
    return []
  return [line.split('\0') for line in log.read_text().split('\0\n') if line]


def launch(script, *args, env=None, tools=None, cwd=ROOT):
  environ = {k: v for k, v in os.environ.items()
             if k not in SETTINGS and not k.startswith('SLURM_')}
  if tools:
    bin_dir, log = tools
    environ['PATH'] = f'{bin_dir}{os.pathsep}{environ["PATH"]}'
    environ['TOOL_LOG'] = str(log)
  environ.update(env or {})
  return subprocess.run([os.path.join(LAUNCH, script), *args], capture_output=True,
                        text=True, timeout=30, env=environ, cwd=cwd)


def printed(proc):
  """The commands a dry run printed, each split as a shell would split it."""
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr == ''
  return [shlex.split(line) for line in proc.stdout.splitlines()]


def option(argv, name):
  values = [a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')]
  assert len(values) == 1, (name, argv)
  return values[0]


def test_scripts_are_executable():
  for script in SCRIPTS:
    mode = os.stat(os.path.join(LAUNCH, script)).st_mode
    assert mode & stat.S_IXUSR, f'chmod +x launch/{script}'


@pytest.mark.parametrize('script', SCRIPTS[:3])
def test_help(script):
  proc = launch(script, '--help')
  assert proc.returncode == 0
  assert proc.stdout.startswith(f'Usage: launch/{script} ')
  assert '--dry-run' in proc.stdout


def test_tpu_vm_runs_the_train_command_on_every_worker(tools):
  proc = launch('tpu_vm.sh', *TPU, '--dry-run', '--', *TRAIN_ARGS)
  [argv] = printed(proc)
  assert argv[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-v5p']
  assert '--zone=us-east5-a' in argv and '--project=my-project' in argv
  assert '--worker=all' in argv
  remote = option(argv, 'command')
  assert 'python3 -m llm_jax.train' in remote
  assert shlex.split(remote) == ['cd', '~/llm_jax', '&&', 'exec', 'env',
                                'LLM_JAX_DISTRIBUTED=1', 'python3', '-m',
                                 'llm_jax.train', *TRAIN_ARGS]
  assert remote.startswith('cd ~/llm_jax && ')  # ~ left for the remote shell

  # Without --dry-run, gcloud gets exactly the printed words.
  proc = launch('tpu_vm.sh', *TPU, '--', *TRAIN_ARGS, tools=tools)
  assert proc.returncode == 0, proc.stderr
  assert calls(tools[1]) == [argv]


def fake_python(path):
  """A stand-in interpreter: records its directory, $K and its arguments."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text('#!/usr/bin/env bash\n'
                  'printf "%s\\0" "$PWD" "${K-unset}" "$@" >> "$TOOL_LOG"\n'
                  'printf "\\n" >> "$TOOL_LOG"\n')
  path.chmod(0o755)
  return str(path)


def remote_shell(command, home, log):
  """Runs a --command string as the worker's login shell would."""
  env = {'PATH': os.environ['PATH'], 'HOME': str(home), 'TOOL_LOG': str(log),
         'GIT_CONFIG_NOSYSTEM': '1'}
  proc = subprocess.run(['bash', '-c', command], capture_output=True, text=True,
                        timeout=30, env=env, cwd=home)
  assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not shutil.which('git'), reason='needs git')
def test_tpu_vm_setup_and_train_commands_run_in_a_shell(tmp_path):
  """The remote commands, run here in bash: clone, install, train, detach."""
  origin = tmp_path / 'origin'
  origin.mkdir()
  (origin / 'constraints.txt').write_text('jax==0.10.2\n')
  git = ['git', '-C', str(origin), '-c', 'user.name=t', '-c', 'user.email=t@t']
  for cmd in (['init', '-q'], ['add', '.'], ['commit', '-q', '-m', 'v1'], ['tag', 'v1.0']):
    subprocess.run(git + cmd, check=True, capture_output=True, timeout=30)
  home = tmp_path / 'home dir'   # the default ~/llm_jax, with a space in it
  home.mkdir()
  fake_python(home / 'venv' / 'bin' / 'python')
  python = '~/venv/bin/python'  # expanded by the worker's shell
  log = tmp_path / 'calls.log'

  proc = launch('tpu_vm.sh', *TPU, '--setup', f'--repo-url={origin}', '--ref=v1.0',
                f'--python={python}', '--env=K=a b', '--', *TRAIN_ARGS,
                env={'DRY_RUN': '1'})
  setup, train = printed(proc)
  assert '--worker=all' in setup and '--worker=all' in train
  checkout = home / 'llm_jax'
  for _ in range(2):  # a second setup updates the checkout in place
    remote_shell(option(setup, 'command'), home, log)
    assert (checkout / 'constraints.txt').exists()
  pip = [str(checkout), 'unset', '-m', 'pip', 'install', '--quiet', '-c', 'constraints.txt',
         '-e', '.[tpu]']
  assert calls(log) == [pip, pip]

  log.unlink()
  remote_shell(option(train, 'command'), home, log)
  assert calls(log) == [[str(checkout), 'a b', '-m', 'llm_jax.train', *TRAIN_ARGS]]

  # --detach: started in the background with nohup, output to the log file.
  proc = launch('tpu_vm.sh', *TPU, f'--python={python}', '--detach', '--dry-run', '--',
                *TRAIN_ARGS)
  [train] = printed(proc)
  command = option(train, 'command')
  assert 'nohup' in command and command.endswith(' &')
  log.unlink()
  remote_shell(command, home, log)
  for _ in range(100):
    if calls(log):
      break
    time.sleep(0.02)
  assert calls(log) == [[str(checkout), 'unset', '-m', 'llm_jax.train', *TRAIN_ARGS]]
  assert (home / 'llm_jax_train.log').exists()


def test_gke_xpk_creates_a_workload(tools):
  proc = launch('gke_xpk.sh', *XPK, '--max-restarts=3', '--dry-run', '--', *TRAIN_ARGS)
  [argv] = printed(proc)
  assert argv[:3] == ['xpk', 'workload', 'create']
  assert option(argv, 'cluster') == 'my-cluster'
  assert option(argv, 'workload') == 'llm-base'
  assert option(argv, 'tpu-type') == 'v5p-128'
  assert option(argv, 'num-slices') == '2'
  assert option(argv, 'docker-image') == 'us-docker.pkg.dev/my-project/llm/llm_jax:v1'
  assert option(argv, 'max-restarts') == '3'
  command = option(argv, 'command')
  assert 'python -m llm_jax.train' in command and '\n' not in command
  assert shlex.split(command) == ['cd', '/app', '&&', 'exec', 'env',
                                 'LLM_JAX_DISTRIBUTED=1', 'python', '-m',
                                  'llm_jax.train', *TRAIN_ARGS]

  proc = launch('gke_xpk.sh', *XPK, '--max-restarts=3', '--', *TRAIN_ARGS, tools=tools)
  assert proc.returncode == 0, proc.stderr
  assert calls(tools[1]) == [argv]


def test_gke_xpk_command_runs_in_a_shell(tmp_path):
  app = tmp_path / 'my app'
  app.mkdir()
  python = fake_python(tmp_path / 'bin' / 'python')
  proc = launch('gke_xpk.sh', *XPK, f'--app-dir={app}', f'--python={python}',
                '--env=K=it\'s "x"', '--dry-run', '--', *TRAIN_ARGS)
  [argv] = printed(proc)
  log = tmp_path / 'calls.log'
  remote_shell(option(argv, 'command'), tmp_path, log)
  assert calls(log) == [[str(app), 'it\'s "x"', '-m', 'llm_jax.train', *TRAIN_ARGS]]


def test_slurm_submits_one_task_per_node(tools):
  args = ['--nodes=8', '--gpus-per-node=8', '--partition=gpu', '--time=24:00:00',
          '--env=XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true']
  proc = launch('slurm.sh', *args, '--dry-run', '--', *TRAIN_ARGS)
  [argv] = printed(proc)
  assert argv[0] == 'sbatch'
  for flag in ['--ntasks-per-node=1', '--nodes=8', '--gpus-per-node=8', '--partition=gpu',
               '--time=24:00:00', f'--chdir={ROOT}']:
    assert flag in argv
  script = argv.index(os.path.join(LAUNCH, 'slurm.sbatch'))
  assert argv[script + 1:] == ['XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true',
                               '--', *TRAIN_ARGS]

  proc = launch('slurm.sh', *args, '--', *TRAIN_ARGS, tools=tools)
  assert proc.returncode == 0, proc.stderr
  assert calls(tools[1]) == [argv]

  # What the job then runs on its nodes.
  proc = launch('slurm.sbatch', *argv[script + 1:], env={**ALLOCATION, 'DRY_RUN': '1'})
  [srun] = printed(proc)
  assert srun[0] == 'srun'
  for flag in ['--nodes=8', '--ntasks=8', '--ntasks-per-node=1', '--cpus-per-task=96']:
    assert flag in srun
  # One process drives all 8 GPUs of its node (JAX would give it only one).
  assert 'JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7' in srun
  assert 'XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true' in srun
  assert srun[-len(TRAIN_ARGS) - 3:] == ['python', '-m', 'llm_jax.train', *TRAIN_ARGS]


def test_slurm_inside_an_allocation_runs_srun(tools, tmp_path):
  env = {**ALLOCATION, 'LLM_JAX_PYTHON': '/shared/venv/bin/python'}
  proc = launch('slurm.sh', '--dry-run', '--', *TRAIN_ARGS, env=env, cwd=tmp_path)
  [srun] = printed(proc)
  assert srun[0] == 'srun' and '--ntasks-per-node=1' in srun
  assert srun[-len(TRAIN_ARGS) - 3:] == ['/shared/venv/bin/python', '-m', 'llm_jax.train',
                                         *TRAIN_ARGS]

  proc = launch('slurm.sh', '--', *TRAIN_ARGS, env=env, tools=tools, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert calls(tools[1]) == [srun]  # and no `scontrol requeue` after it


@pytest.mark.parametrize('srun_status, requeue, requeued', [
    (143, '', True),      # stopped on SIGTERM before the time limit: requeue, resume
    (143, '0', False),    # LLM_JAX_REQUEUE=0 (slurm.sh --no-requeue)
    (0, '', False),       # finished
    (1, '', False),       # failed: no loop
])
def test_slurm_job_requeues_after_sigterm(tools, srun_status, requeue, requeued):
  env = {**ALLOCATION, 'STUB_EXIT_srun': str(srun_status), 'LLM_JAX_REQUEUE': requeue}
  proc = launch('slurm.sbatch', '--', *TRAIN_ARGS, env=env, tools=tools)
  assert proc.returncode == srun_status
  made = calls(tools[1])
  assert made[0][0] == 'srun'
  assert made[1:] == ([['scontrol', 'requeue', '4242']] if requeued else [])


@pytest.mark.parametrize('script, args, message', [
    ('tpu_vm.sh', ['--zone=z', '--', *TRAIN_ARGS], 'no TPU name: pass --tpu=NAME'),
    ('tpu_vm.sh', ['--tpu=t', '--', *TRAIN_ARGS], 'no zone: pass --zone=ZONE'),
    ('tpu_vm.sh', [*TPU, '--', '--config=configs/base.py'], 'no --workdir for llm_jax.train'),
    ('tpu_vm.sh', [*TPU, '--config=configs/base.py'], "unknown option '--config'"),
    ('tpu_vm.sh', [*TPU, '--env=not an assignment', '--', *TRAIN_ARGS], '--env wants NAME=VALUE'),
    ('tpu_vm.sh', [*TPU, '--zone'], '--zone needs a value'),
    ('gke_xpk.sh', [*XPK[:-1], '--', *TRAIN_ARGS], 'no image: pass --docker-image=IMAGE'),
    ('gke_xpk.sh', [*XPK, '--workload=Bad_Name', '--', *TRAIN_ARGS], "bad workload name 'Bad_Name'"),
    ('gke_xpk.sh', [*XPK, '--num-slices=two', '--', *TRAIN_ARGS], '--num-slices wants a positive'),
    ('gke_xpk.sh', [*XPK, '--', '--workdir=gs://b/r'], 'no --config for llm_jax.train'),
    ('slurm.sh', ['--', '--workdir=/shared/runs/x'], 'no --config for llm_jax.train'),
    ('slurm.sh', ['--nodes=0', '--', *TRAIN_ARGS], '--nodes wants a positive integer'),
    ('slurm.sh', ['--srun', '--', *TRAIN_ARGS], '--srun needs an allocation'),
    ('slurm.sbatch', ['--', *TRAIN_ARGS], 'not inside a Slurm allocation'),
])
def test_bad_settings_give_one_clear_line(tools, script, args, message):
  proc = launch(script, *args, tools=tools)  # not a dry run: nothing may start
  assert proc.returncode == 2, proc.stderr
  assert proc.stdout == ''
  assert len(proc.stderr.splitlines()) == 1, proc.stderr
  assert proc.stderr.startswith(f'launch/{script}: error: ')
  assert message in proc.stderr
  assert calls(tools[1]) == []


def test_shellcheck_clean():
  shellcheck = shutil.which('shellcheck')
  if not shellcheck:
    pytest.skip('shellcheck is not installed (apt-get install shellcheck, '
                'or brew install shellcheck)')
  files = [os.path.join(LAUNCH, f) for f in [*SCRIPTS, 'lib.sh']]
  proc = subprocess.run([shellcheck, *files], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stdout + proc.stderr
