r"""Export a run as a TensorFlow SavedModel: ``python -m llm_jax.export``.

    python -m llm_jax.export --workdir=runs/tiny --out=runs/tiny/export/1 [--quantize=int8|int4]

The whole generation loop (prefill plus KV-cache steps) becomes one
SavedModel function, with a ``generate_text`` signature that tokenizes in the
graph (docs/serving.md documents the signatures). A run with a task head
(``model.head``) gets ``classify`` or ``answer`` signatures instead, tokenizing in
the graph where tensorflow-text can (docs/encoders.md). ``--quantize`` stores the
weights as int8 (a scale per output channel) or int4 (a scale per
``--group_size`` inputs) and records the size and validation perplexity of
float32, int8 and int4 in assets.extra/llm_jax_export.json
(docs/compression.md). The export is written to a
temporary directory beside ``--out`` and renamed into place; ``--overwrite``
replaces only an earlier export, never a run or another directory. Bad input
exits 2 with one line; ``--help`` exits 0.
"""

from absl import flags

from llm_jax import cli
from llm_jax.core.errors import UserError
from llm_jax.deploy import options

PROG = 'python -m llm_jax.export'
FLAGS = cli.flag_values()
flags.DEFINE_string('workdir', None, 'The run directory to export.', flag_values=FLAGS)
flags.DEFINE_string('out', None, 'SavedModel directory to create, e.g. RUN/export/1 '
                    '(TF Serving wants a numbered version).', flag_values=FLAGS)
flags.DEFINE_integer('step', None, 'Checkpoint step (default: newest).', flag_values=FLAGS)
flags.DEFINE_enum('quantize', 'none', ['none', 'int8', 'int4'],
                  'Weight-only: int8 (per-channel scales) or int4 (group-wise '
                  'scales, two weights a byte).', flag_values=FLAGS)
flags.DEFINE_integer('group_size', 64, 'With --quantize=int4: inputs per scale '
                     '(even; e.g. 64 or 128).', flag_values=FLAGS)
flags.DEFINE_bool('int4_embeddings', False, 'With --quantize=int4: the embedding '
                  'tables and LM head in int4 too (default int8: they cost most of '
                  "int4's perplexity loss).", flag_values=FLAGS)
flags.DEFINE_enum('dequantize', 'once', list(options.DEQUANTIZE),
                  'With --quantize: once (the first call fills float32 copies of the '
                  'weights that every call reads and frees the stored ones: as fast '
                  'as float32, and as much memory) or every_call (no copies: least '
                  'memory, 3.5x slower per token on CPU).', flag_values=FLAGS)
flags.DEFINE_integer('max_new_tokens', 128, 'Output width W: the most new tokens a '
                     'request can get (capped at the context).', lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_list('batch_buckets', ['1', '4', '8'], 'Batch sizes to warm up.',
                  flag_values=FLAGS)
flags.DEFINE_list('prompt_buckets', [], 'Prompt widths to warm up and to pad text '
                  'prompts to (default: 16, 32, 64, ... below the context, and the '
                  'context).', flag_values=FLAGS)
flags.DEFINE_list('platforms', list(options.PLATFORMS), 'Lower for these.',
                  flag_values=FLAGS)
flags.DEFINE_bool('overwrite', False, 'Replace an earlier export at --out.',
                  flag_values=FLAGS)
flags.DEFINE_bool('text_signature', True, 'Add the generate_text signature '
                  '(SentencePiece ops from tensorflow-text in the graph; a server '
                  'must load them, see docs/serving.md). --notext_signature: ids only.',
                  flag_values=FLAGS)
flags.DEFINE_integer('eval_batches', 8, 'With --quantize: validation batches for '
                     'the float32/int8/int4 perplexity check (0 skips it).', lower_bound=0,
                     flag_values=FLAGS)
flags.mark_flags_as_required(['workdir', 'out'], flag_values=FLAGS)


def _ints(name: str, values: list[str]) -> list[int]:
  try:
    out = [int(v) for v in values]
  except ValueError:
    raise UserError(f'--{name}={",".join(values)} must be comma-separated '
                    'positive integers.') from None
  if any(v <= 0 for v in out):
    raise UserError(f'--{name} values must be positive.')
  return out


def _main() -> dict:
  from llm_jax.deploy import saved_model  # pylint: disable=g-import-not-at-top  # TensorFlow: 6 s.
  return saved_model.export(
      FLAGS.workdir, FLAGS.out, step=FLAGS.step, quantize=FLAGS.quantize,
      group_size=FLAGS.group_size, int4_embeddings=FLAGS.int4_embeddings,
      max_new_tokens=FLAGS.max_new_tokens,
      batch_buckets=_ints('batch_buckets', FLAGS.batch_buckets),
      prompt_buckets=_ints('prompt_buckets', FLAGS.prompt_buckets) or None,
      platforms=FLAGS.platforms, overwrite=FLAGS.overwrite,
      text_signature=FLAGS.text_signature, eval_batches=FLAGS.eval_batches,
      dequantize=FLAGS.dequantize)


def main(argv: list[str] | None = None) -> dict:
  """Runs the command on ``argv`` (default: the process's arguments)."""
  return cli.run(_main, FLAGS, argv, doc=__doc__, prog=PROG)


if __name__ == '__main__':
  main()
