r"""Rank completions for ``<mask>`` with an encoder run.

    python -m llm_jax.fill_mask --workdir=RUN --text='import <mask>' [--top_k=5]

Each ``<mask>`` in the text is one token; the encoder (``model.kind=
'encoder'``) sees the whole sentence at once and its softmax at that position
ranks the vocabulary (special pieces left out). ``--candidates=a,b`` ranks only
those words instead (each must be one token). Prints one ranked list per mask
with probabilities and the sentence filled with the best choice. Bad input
exits 2 with one line; ``--help`` exits 0. ``python -m llm_jax.generate
--fill_mask`` runs the same code.
"""

from absl import flags

from llm_jax import cli
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.inference.fill_mask import fill_mask, fill_text
from llm_jax.runs import workdir as workdir_lib

PROG = 'python -m llm_jax.fill_mask'
FLAGS = cli.flag_values()
flags.DEFINE_string('workdir', None, 'An encoder run directory.', flag_values=FLAGS)
flags.DEFINE_string('text', None, 'A sentence with <mask> in it.', flag_values=FLAGS)
flags.DEFINE_integer('top_k', 5, 'Completions per mask.', lower_bound=1, flag_values=FLAGS)
flags.DEFINE_list('candidates', [], 'Comma-separated words to rank instead.',
                  flag_values=FLAGS)
flags.DEFINE_integer('step', None, 'Checkpoint step (default newest).', flag_values=FLAGS)
flags.mark_flags_as_required(['workdir', 'text'], flag_values=FLAGS)


def _main() -> list[list[tuple[str, float]]]:
  run = workdir_lib.load(FLAGS.workdir, FLAGS.step)
  ranked = fill_mask(run, FLAGS.text, top_k=FLAGS.top_k,
                     candidates=[c for c in FLAGS.candidates if c] or None)
  for n, choices in enumerate(ranked, 1):
    print(f'<mask> {n}:')
    for rank, (piece, prob) in enumerate(choices, 1):
      print(f'  {rank}. {piece!r:20} {prob:.4f}')
  print(fill_text(FLAGS.text, tokenizer_lib.MASK_PIECE, [c[0][0] for c in ranked]))
  return ranked


def main(argv: list[str] | None = None) -> list[list[tuple[str, float]]]:
  """Runs the command on ``argv`` (default: the process's arguments)."""
  return cli.run(_main, FLAGS, argv, doc=__doc__, prog=PROG)


if __name__ == '__main__':
  main()
