r"""Train a language model: ``python -m llm_jax.train --config=configs/base.py``.

Flags:
  --config=FILE        an ml_collections config file (``get_config()``);
  --config.a.b=VALUE   override any key that configs/base.py declares;
  --workdir=DIR        where checkpoints, TensorBoard events and config.json go
                       (default runs/<config.name>). Rerunning with the same
                       workdir resumes from its latest checkpoint.

Notebooks call the same entry point: ``llm_jax.train.run(config, workdir)``.
Ctrl-C or SIGTERM saves a checkpoint of the current step and exits with status
128 + the signal number (130 for Ctrl-C, 143 for SIGTERM); bad input exits 2.
"""

import sys

from absl import flags

from llm_jax import cli
from llm_jax.core.configuration import check_keys
from llm_jax.jobs.train import run  # The notebook door: llm_jax.train.run(config, workdir).
from llm_jax.training import aot, sharding, trainer

PROG = 'python -m llm_jax.train'
FLAGS = cli.flag_values()
_CONFIG = cli.define_config(FLAGS)

_WORKDIR = flags.DEFINE_string(
    'workdir', '', 'Run directory (default runs/<config.name>); reruns resume.',
    flag_values=FLAGS)
_COORDINATOR = flags.DEFINE_string(
    'coordinator', '', 'Multi-host: HOST:PORT of process 0 (not needed on TPU VMs '
    'or under SLURM, where JAX finds it).', flag_values=FLAGS)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Multi-host: processes in all.',
                                      flag_values=FLAGS)
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'Multi-host: this process, 0..N-1.',
                                   flag_values=FLAGS)
_DRY_RUN = flags.DEFINE_bool(
    'dry_run', False, 'Compile one train step for the configured mesh and print '
    'per-device memory (parameters, optimizer state, temporaries); no training.',
    flag_values=FLAGS)
_TOPOLOGY = flags.DEFINE_string(
    'topology', '', 'With --dry_run: compile for this TPU slice instead of the '
    "local devices, e.g. v5p:2x2x1 (needs pip install -e '.[tpu]').", flag_values=FLAGS)


def _main() -> dict:
  config = cli.load_config(_CONFIG, FLAGS)
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value)
  if _DRY_RUN.value or _TOPOLOGY.value:
    check_keys(config)
    trainer.check_config(config)
    print(aot.format_report(aot.dry_run(config, _TOPOLOGY.value)), flush=True)
    return {}
  return run(config, _WORKDIR.value or None)


def main(argv: list[str] | None = None) -> dict:
  """Runs the command on ``argv`` (default: the process's arguments)."""
  argv = sys.argv[1:] if argv is None else argv
  result = cli.run(_main, FLAGS, argv, doc=__doc__, prog=PROG,
                   on_error=cli.config_error(argv))
  if result.get('stopped_by_signal'):
    sys.exit(128 + result['stopped_by_signal'])
  return result


if __name__ == '__main__':
  main()
