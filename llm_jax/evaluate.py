r"""Evaluate a trained run: ``python -m llm_jax.evaluate --workdir=RUN``.

Language modelling (default): perplexity and bits per byte on the run's own
validation split, through the same windows the training loop evaluates, or on
any source (``--source``, ``--paths``) or text files (``--file=GLOB``). An
encoder run reports its masked-token loss and accuracy instead.

Tasks (``--tasks=FILE.jsonl``): ``{"prompt", "reference"}`` lines are
generated greedily and scored with BLEU and ROUGE-1/2/L F1; ``{"prompt",
"answer"}`` lines by exact match of the first generated line.

An encoder's task head (``model.head``; docs/encoders.md) is scored on
``--task_data`` (default: the run's ``task.val_path``): classification by
accuracy, macro-F1 and the confusion matrix, beside the majority-class
baseline; QA by the official SQuAD exact match and F1 (v2: also the
answerable and unanswerable parts).

Preferences (``--preferences=GLOB``): ``{"prompt", "chosen", "rejected"}``
lines; a reward model's (or DPO's implicit) reward accuracy and margin, and
for any decoder how often the chosen response is the likelier one
(docs/alignment.md).

Results print as a Markdown table and go to ``<workdir>/eval/<name>.json``,
with the run's size: parameters (all, and non-zero), the sparsity of its block
kernels (after ``python -m llm_jax.prune``) and bytes stored dense and sparse.

Plots: ``python -m llm_jax.evaluate --plot --workdir=RUN [--workdir=RUN2]
--out=curves.png`` draws loss and learning-rate curves from ``<workdir>/tb``.

Bad input exits 2 with one line; ``--help`` exits 0.
"""

import os
import re

from absl import flags

from llm_jax import cli
from llm_jax.core.errors import UserError
from llm_jax.evaluation import encoder_tasks, lm, pairs, plots, tasks
from llm_jax.runs import workdir as workdir_lib

PROG = 'python -m llm_jax.evaluate'
FLAGS = cli.flag_values()
flags.DEFINE_multi_string('workdir', [], 'Run directory; repeat with --plot to '
                          'compare runs.', flag_values=FLAGS)
flags.DEFINE_integer('step', None, 'Checkpoint step (default newest).', flag_values=FLAGS)
flags.DEFINE_enum('split', 'val', ['val', 'train'], 'The split of the run\'s data.',
                  flag_values=FLAGS)
flags.DEFINE_string('source', '', 'Another data.source to read (text, jsonl, tfds, '
                    'default).', flag_values=FLAGS)
flags.DEFINE_string('paths', '', 'data.paths for --source.', flag_values=FLAGS)
flags.DEFINE_string('file', '', 'Glob of text files to score whole.', flag_values=FLAGS)
flags.DEFINE_integer('eval_batches', None, "Batches (default train.eval_batches: the "
                     "loop's windows); 0: every window.", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer('batch_size', None, 'Rows per batch (default train.batch_size).',
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string('tasks', '', 'JSONL of {"prompt","reference"} / {"prompt","answer"}.',
                    flag_values=FLAGS)
flags.DEFINE_string('task_data', '', "A task head's examples: JSONL (classification) or "
                    "SQuAD JSON (qa); default the run's task.val_path.", flag_values=FLAGS)
flags.DEFINE_string('preferences', '', 'JSONL glob of {"prompt","chosen","rejected"} '
                    'pairs: reward accuracy and margins.', flag_values=FLAGS)
flags.DEFINE_integer('max_new_tokens', 32, 'Generated tokens per task.', lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_string('name', '', 'Results file name under <workdir>/eval/ (no .json; '
                    'letters, digits, ".", "_" and "-").', flag_values=FLAGS)
flags.DEFINE_bool('plot', False, 'Draw loss/LR curves instead of evaluating.',
                  flag_values=FLAGS)
flags.DEFINE_string('out', '', 'With --plot: the PNG to write.', flag_values=FLAGS)

_NAME = re.compile(r'[A-Za-z0-9_][A-Za-z0-9._-]*')


def _result_name() -> str:
  """The results file's name: --name (checked: a name, not a path) or a default."""
  if FLAGS.name:
    if not _NAME.fullmatch(FLAGS.name) or '..' in FLAGS.name:
      raise UserError(f'--name={FLAGS.name!r} is not a plain name: use letters, '
                      'digits, ".", "_" and "-" (no "/" or ".."); the results go to '
                      '<workdir>/eval/<name>.json.')
    return FLAGS.name
  if FLAGS.tasks:
    return 'tasks-' + os.path.splitext(os.path.basename(FLAGS.tasks))[0]
  if FLAGS.task_data:
    return 'task-' + os.path.splitext(os.path.basename(FLAGS.task_data))[0]
  if FLAGS.preferences:
    return 'preferences-' + ''.join(c if c.isalnum() else '_'
                                    for c in FLAGS.preferences).strip('_')
  if FLAGS.file:
    return 'file-' + ''.join(c if c.isalnum() else '_' for c in FLAGS.file).strip('_')
  return f'{FLAGS.source or "data"}-{FLAGS.split}'


def _main() -> dict:
  if not FLAGS.workdir:
    raise UserError('No run given. Pass --workdir=RUN (the directory a training run wrote).')
  if FLAGS.plot:
    if not FLAGS.out:
      raise UserError('--plot needs --out=FILE.png.')
    path = plots.plot(FLAGS.workdir, FLAGS.out)
    print(f'Wrote {path}')
    return {'plot': path}
  if len(FLAGS.workdir) > 1:
    raise UserError('Give one --workdir to evaluate (several only with --plot).')
  name = _result_name()
  run = workdir_lib.load(FLAGS.workdir[0], FLAGS.step)
  results = {'workdir': run.workdir, 'step': run.step, **lm.model_size(run)}
  if run.model_cfg.head != 'lm':
    results.update(encoder_tasks.evaluate_run(run, FLAGS.task_data))
  elif FLAGS.task_data:
    raise UserError(f'--task_data scores a task head; {run.workdir} has model.head=\'lm\'.')
  elif FLAGS.tasks:
    results.update(tasks=FLAGS.tasks, **tasks.score_tasks(
        run, tasks.read_tasks(FLAGS.tasks), max_new_tokens=FLAGS.max_new_tokens))
  elif FLAGS.preferences:
    results.update(pairs.evaluate_preferences(run, FLAGS.preferences,
                                              batch_size=FLAGS.batch_size))
  elif FLAGS.file:
    results.update(lm.evaluate_files(run, FLAGS.file, batch_size=FLAGS.batch_size))
  else:
    results.update(lm.evaluate_split(run, split=FLAGS.split, source=FLAGS.source,
                                     paths=FLAGS.paths, num_batches=FLAGS.eval_batches,
                                     batch_size=FLAGS.batch_size))
  path = lm.write_json(run.workdir, name, results)
  print(lm.markdown_table(results))
  if 'confusion' in results:
    print('\n' + encoder_tasks.confusion_table(results['labels'], results['confusion']))
  print(f'\nWrote {path}')
  return results


def main(argv: list[str] | None = None) -> dict:
  """Runs the command on ``argv`` (default: the process's arguments)."""
  return cli.run(_main, FLAGS, argv, doc=__doc__, prog=PROG)


if __name__ == '__main__':
  main()
