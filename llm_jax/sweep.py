r"""Hyper-parameter search on Optuna: ``python -m llm_jax.sweep --study=DIR ...``.

Each trial is an ordinary training run in DIR/trials/NNNN, trained with the
study's config and the trial's values of the searched keys; the objective is
the validation loss (or bits per byte) at the end of training, minimised.

  python -m llm_jax.sweep --config=configs/tiny.py --study=runs/sweeps/lr \
      --space='optim.learning_rate=loguniform(1e-4,1e-2)' \
      --space='model.num_layers=choice(2,4)' --sampler=tpe --trials=12 --prune=median
  python -m llm_jax.sweep --study=runs/sweeps/lr --report    # table, best config, plots

--space takes the config's own dotted keys (configs/base.py declares them):
loguniform(LOW,HIGH), uniform(LOW,HIGH[,STEP]), int(LOW,HIGH[,STEP]),
logint(LOW,HIGH), choice(A,B,...). --sampler=grid runs every point of a grid
of choice/int dimensions; random and tpe draw --trials points, reproducibly
for a --seed.

The study (its settings and trials) is stored in DIR/study.db, or in the
database --storage names (postgresql://USER:PASSWORD@HOST/DB, shared by
workers on many machines). The same command started several times (on one
machine or several) splits the trials; no trial runs twice. A rerun of a
killed sweep continues it: finished trials are kept and the interrupted one
resumes from its last checkpoint. Ctrl-C stops the running trial with a
checkpoint and exits 130.
"""

import functools
import sys

from absl import flags

from llm_jax import cli
from llm_jax.sweeps import report, study, worker

PROG = 'python -m llm_jax.sweep'
FLAGS = cli.flag_values()
_CONFIG = cli.define_config(FLAGS)
_STUDY = flags.DEFINE_string('study', None, 'The study directory (e.g. runs/sweeps/lr).',
                             flag_values=FLAGS)
_SPACE = flags.DEFINE_multi_string(
    'space', [], "One searched key: --space='optim.learning_rate=loguniform(1e-4,1e-2)'. "
    'Repeat for each key; a rerun may leave it out.', flag_values=FLAGS)
_SAMPLER = flags.DEFINE_enum('sampler', 'tpe', study.SAMPLERS, 'How trials are chosen.',
                             flag_values=FLAGS)
_TRIALS = flags.DEFINE_integer('trials', 0, 'Trials in the sweep (grid: its size).',
                               lower_bound=0, flag_values=FLAGS)
_SEED = flags.DEFINE_integer('seed', 0, "The sampler's seed.", flag_values=FLAGS)
_PRUNE = flags.DEFINE_enum('prune', 'none', study.PRUNERS,
                           'Stop trials whose validation loss at an evaluation is worse '
                           "than the median of earlier trials' at that step.",
                           flag_values=FLAGS)
_PRUNE_STARTUP = flags.DEFINE_integer('prune_startup', 2, 'Trials that finish before the '
                                      'pruner may stop one.', lower_bound=0,
                                      flag_values=FLAGS)
_PRUNE_WARMUP = flags.DEFINE_integer('prune_warmup', 0, 'Training steps before a trial '
                                     'may be stopped.', lower_bound=0, flag_values=FLAGS)
_OBJECTIVE = flags.DEFINE_enum('objective', 'val_loss', study.OBJECTIVES,
                               'The final validation metric to minimise (val_bpb: bits '
                               'per byte).', flag_values=FLAGS)
_STORAGE = flags.DEFINE_string('storage', '', 'Database URL of the study (default '
                               'sqlite in the study directory).', flag_values=FLAGS)
_STUDY_NAME = flags.DEFINE_string('study_name', '', "The study's name in the storage "
                                  "(default the directory's name).", flag_values=FLAGS)
_REPORT = flags.DEFINE_bool('report', False, 'Only write the report (report.md and '
                            'PNGs in the study directory) and print it.', flag_values=FLAGS)

# Settings a study records; None where the flag was not given.
_RECORDED = {'space': _SPACE, 'sampler': _SAMPLER, 'seed': _SEED, 'prune': _PRUNE,
             'prune_startup': _PRUNE_STARTUP, 'prune_warmup': _PRUNE_WARMUP,
             'objective': _OBJECTIVE, 'trials': _TRIALS}


def _main(argv: list[str]) -> dict:
  if not _STUDY.value:
    cli.fail(f'Pass --study=DIR, the study directory (e.g. runs/sweeps/lr). See {PROG} '
             '--help.')
  if _REPORT.value:
    result = report.make(_STUDY.value, storage=_STORAGE.value, study_name=_STUDY_NAME.value)
    print(result['text'], flush=True)
    return result
  config = cli.load_config(_CONFIG, FLAGS) if FLAGS['config'].present else None
  given = {name: (f.value if FLAGS[f.name].present else None) for name, f in _RECORDED.items()}
  given['config_args'] = _config_args(argv)
  return worker.run(_STUDY.value, given, config, storage=_STORAGE.value,
                    study_name=_STUDY_NAME.value, trials=_TRIALS.value)


def _config_args(argv: list[str]) -> list[str]:
  """The --config flags as given (for the record and the best config's command)."""
  out = []
  for i, a in enumerate(argv):
    if a == '--config' or (a.startswith('--config.') and '=' not in a):
      out.append(f'{a}={argv[i + 1]}' if i + 1 < len(argv) else a)  # --flag VALUE
    elif a.startswith(('--config=', '--config.')):
      out.append(a)
  return out


def main(argv: list[str] | None = None) -> dict:
  """Runs the command on ``argv`` (default: the process's arguments)."""
  argv = sys.argv[1:] if argv is None else argv
  result = cli.run(functools.partial(_main, argv), FLAGS, argv, doc=__doc__, prog=PROG,
                   on_error=cli.config_error(argv))
  if result.get('stopped_by_signal'):
    sys.exit(128 + result['stopped_by_signal'])
  return result


if __name__ == '__main__':
  main()
