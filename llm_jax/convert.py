r"""Hugging Face checkpoints in and out, and vocabulary extension.

    python -m llm_jax.convert import --hf_dir=DIR --workdir=OUT [--seq_len=N]
    python -m llm_jax.convert export --workdir=RUN --out=DIR [--format=llama|qwen2|gpt2|bert|roberta] [--step=N]
    python -m llm_jax.convert extend_vocab --workdir=RUN --text=GLOB --num_pieces=N --out=OUT

import        reads ``config.json`` and ``*.safetensors`` (one file or a shard
              set) of a GPT-2, LLaMA-family (LLaMA, Mistral, Qwen2) or
              BERT/RoBERTa (masked LM, sequence classification, QA) model and
              writes an llm_jax run directory (weights at checkpoints/0, a
              fresh optimizer state, and the tokenizer: tokenizer.model, or
              tokenizer.json from tokenizer.json / vocab.txt / vocab.json).
export        writes ``config.json`` + ``model.safetensors`` (and the tokenizer)
              that ``transformers`` loads with ``from_pretrained``.
extend_vocab  learns up to N SentencePiece pieces from the text files (or JSONL
              'text' fields), appends those the tokenizer lacks (old ids
              unchanged) and writes OUT with grown embedding and output rows.
              Continue it with init_from. (SentencePiece only: a Hugging Face
              tokenizer cannot be extended.)

Only safetensors are read or written (never pickle). Outputs are written
under a temporary name and renamed into place; an existing non-empty output
directory is refused. Bad input exits 2 with one line; ``--help`` exits 0.
"""

from absl import flags

from llm_jax import cli
from llm_jax.core.errors import UserError
from llm_jax.interchange import hf
from llm_jax.runs import vocab

PROG = 'python -m llm_jax.convert'
FLAGS = cli.flag_values()
flags.DEFINE_string('hf_dir', None, 'import: the Hugging Face directory to read.',
                    flag_values=FLAGS)
flags.DEFINE_string('workdir', None, 'import: the run directory to create; export '
                    'and extend_vocab: the run to read.', flag_values=FLAGS)
flags.DEFINE_string('out', None, 'export, extend_vocab: the directory to create.',
                    flag_values=FLAGS)
flags.DEFINE_integer('seq_len', 0, 'import: the context to train with (0: the '
                     "model's own).", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_enum('format', '', ['', *hf.FORMATS], 'export: the HF architecture '
                  "(default: the model's own family).", flag_values=FLAGS)
flags.DEFINE_integer('step', None, 'export: checkpoint step (default newest).',
                     flag_values=FLAGS)
flags.DEFINE_string('text', None, 'extend_vocab: comma-separated globs of new text.',
                    flag_values=FLAGS)
flags.DEFINE_integer('num_pieces', None, 'extend_vocab: the most pieces to add.',
                     lower_bound=1, flag_values=FLAGS)

_NEEDS = {'import': ('hf_dir', 'workdir'), 'export': ('workdir', 'out'),
          'extend_vocab': ('workdir', 'text', 'num_pieces', 'out')}


def _main(command: str) -> str:
  if command not in _NEEDS:
    raise UserError(f'Unknown command {command!r}: use one of {", ".join(_NEEDS)} '
                    f'({PROG} --help lists their flags).')
  for name in _NEEDS[command]:
    if FLAGS[name].value in (None, ''):
      raise UserError(f'{command} needs --{name}=...')
  if command == 'import':
    out = hf.import_hf(FLAGS.hf_dir, FLAGS.workdir, FLAGS.seq_len)
    print(f'Imported {FLAGS.hf_dir} into {out}.')
  elif command == 'export':
    out = hf.export_hf(FLAGS.workdir, FLAGS.out, FLAGS.format, FLAGS.step)
    print(f'Exported {FLAGS.workdir} to {out}.')
  else:
    out = vocab.extend_vocab_workdir(FLAGS.workdir, FLAGS.text, FLAGS.num_pieces,
                                     FLAGS.out)
    print(f'Extended vocabulary written to {out}.')
  return out


def main(argv: list[str] | None = None) -> str:
  """Runs the command on ``argv`` (default: the process's arguments)."""
  return cli.run(_main, FLAGS, argv, doc=__doc__, prog=PROG, positional=1)


if __name__ == '__main__':
  main()
