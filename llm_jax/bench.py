r"""Benchmarks you can rerun: ``python -m llm_jax.bench SUBCOMMAND [flags]``.

Subcommands (each prints a Markdown table and, with ``--out=FILE``, writes the
same figures as JSON):

  train       compile time, steady-state step time, tokens/s, MFU and peak
              memory of the real train step on random tokens (no TensorFlow).
  data        batches/s of the input pipeline against the batches/s a
              train step consumes.
  checkpoint  save and restore bytes/s of the train state, and how long an
              async save holds the loop against the step time.
  decode      generation tokens/s, prefill and per-token latency of a run,
              in JAX and through its exported SavedModel (needs --workdir).

Examples:
  python -m llm_jax.bench train --config=configs/gpt2_small_cpu.py
  python -m llm_jax.bench train --config=configs/base.py --config.model.dtype=bfloat16
  python -m llm_jax.bench data --config=configs/base.py --out=/tmp/data.json
  python -m llm_jax.bench checkpoint --config=configs/base.py
  python -m llm_jax.bench decode --workdir=runs/tiny --batch=1,8

benchmarks/README.md holds the measured figures and the commands behind them.
"""

import sys

from absl import flags

from llm_jax import cli
from llm_jax.core import files
from llm_jax.core.configuration import check_keys
from llm_jax.core.errors import UserError

PROG = 'python -m llm_jax.bench'
SUBCOMMANDS = ('train', 'data', 'checkpoint', 'decode')
FLAGS = cli.flag_values()
_CONFIG = cli.define_config(FLAGS)
flags.DEFINE_integer('steps', 20, 'Timed steps (train, checkpoint) or batches (data) '
                     'after the warm-up.', lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer('warmup', 3, 'Untimed steps after the compile.', lower_bound=0,
                     flag_values=FLAGS)
flags.DEFINE_string('out', '', 'Also write the figures as JSON to this file.',
                    flag_values=FLAGS)
flags.DEFINE_integer('save_every', 5, 'checkpoint: steps between async saves in the '
                     'timed loop.', flag_values=FLAGS)
flags.DEFINE_string('dir', '', 'checkpoint: where to write (default a temporary '
                    'directory, removed afterwards).', flag_values=FLAGS)
flags.DEFINE_string('workdir', None, 'decode: a training run to load and export.',
                    flag_values=FLAGS)
flags.DEFINE_list('batch', ['1', '8'], 'decode: batch sizes.', flag_values=FLAGS)
flags.DEFINE_integer('prompt_len', 32, 'decode: prompt tokens per row.', lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer('max_new_tokens', 64, 'decode: new tokens per row.', lower_bound=2,
                     flag_values=FLAGS)
flags.DEFINE_integer('repeats', 3, 'decode: timed runs (the best counts).',
                     lower_bound=1, flag_values=FLAGS)


def _decode() -> dict:
  from llm_jax.perf import decode  # pylint: disable=g-import-not-at-top  (imports TF)
  if not FLAGS.workdir:
    raise UserError('bench decode needs --workdir=RUN (a training run to export).')
  try:
    batches = [int(b) for b in FLAGS.batch if b]
  except ValueError:
    raise UserError(f'--batch={",".join(FLAGS.batch)} must be comma-separated '
                    'integers.') from None
  if not batches or min(batches) < 1:
    raise UserError('--batch values must be at least 1.')
  result = decode.bench(FLAGS.workdir, batches, FLAGS.prompt_len, FLAGS.max_new_tokens,
                        FLAGS.repeats, log=lambda m: print(m, file=sys.stderr, flush=True))
  print(decode.markdown(result), flush=True)
  return result


def _measure(subcommand: str) -> dict:
  # Imported here: `bench train` must run where TensorFlow is not installed.
  from llm_jax.perf import measure  # pylint: disable=g-import-not-at-top
  config = cli.load_config(_CONFIG, FLAGS)
  check_keys(config)
  kw = dict(steps=FLAGS.steps, warmup=FLAGS.warmup)
  if subcommand == 'checkpoint':
    kw.update(save_every=FLAGS.save_every, directory=FLAGS.dir)
  fn = {'train': measure.bench_train, 'data': measure.bench_data,
        'checkpoint': measure.bench_checkpoint}[subcommand]
  with config.unlocked():
    result, rows = fn(config, **kw)
  print(f'\n## bench {subcommand}\n\n{measure.table(rows)}\n', flush=True)
  return result


def _main(subcommand: str) -> dict:
  if subcommand not in SUBCOMMANDS:
    raise UserError(f'Unknown subcommand {subcommand!r}: use one of '
                    f'{", ".join(SUBCOMMANDS)}. Example: {PROG} train '
                    '--config=configs/base.py')
  result = _decode() if subcommand == 'decode' else _measure(subcommand)
  if FLAGS.out:
    files.atomic_write_json(FLAGS.out, result)
    print(f'Wrote {FLAGS.out}', flush=True)
  return result


def main(argv: list[str] | None = None) -> dict:
  """Runs the command on ``argv`` (default: the process's arguments)."""
  argv = sys.argv[1:] if argv is None else argv
  return cli.run(_main, FLAGS, argv, doc=__doc__, prog=PROG, positional=1,
                 on_error=cli.config_error(argv))


if __name__ == '__main__':
  main()
