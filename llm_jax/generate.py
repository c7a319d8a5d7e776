r"""Generate text from a trained run: ``python -m llm_jax.generate --workdir=RUN``.

    python -m llm_jax.generate --workdir=runs/tiny --prompt='def main(' \
        --max_new_tokens=64 --temperature=0.8 --top_p=0.95 --seed=1 --stream

Flags:
  --workdir=DIR          a training run (reads its newest checkpoint).
  --prompt=TEXT          a prompt (repeat the flag for several); ``\n`` and
                         ``\t`` escapes are expanded.
  --prompts_file=FILE    one prompt per line (escapes expanded as above).
  --prompt_ids=1,2,3     a prompt as token ids (runs without a tokenizer).
  --max_new_tokens, --temperature (0: greedy), --top_k (0: off),
  --top_p (1: off), --seed, --stream (print tokens as they come).
  --fill_mask            an encoder run: rank completions for <mask> in
                         --text=... (the flags of ``python -m llm_jax.fill_mask``).

All prompts run as one left-padded batch through ``decode.decode_jit`` (the
function the SavedModel export wraps); a prompt that does not fit the model's
context (it must leave room for one new token) is an error, exit status 2.
"""

import os
import sys

from absl import flags

from llm_jax import cli
from llm_jax.core.errors import UserError
from llm_jax.inference import decode
from llm_jax.runs import workdir

PROG = 'python -m llm_jax.generate'
FLAGS = cli.flag_values()
flags.DEFINE_string('workdir', None, 'The run directory to load.', flag_values=FLAGS)
flags.DEFINE_integer('step', None, 'Checkpoint step (default: newest).', flag_values=FLAGS)
flags.DEFINE_multi_string('prompt', [], 'Prompt text; repeatable.', flag_values=FLAGS)
flags.DEFINE_string('prompts_file', None, 'File, one prompt a line.', flag_values=FLAGS)
flags.DEFINE_multi_string('prompt_ids', [], 'A prompt as comma-separated token ids.',
                          flag_values=FLAGS)
flags.DEFINE_integer('max_new_tokens', 64, 'New tokens per prompt at most.',
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_float('temperature', 0.8, 'Sampling temperature; 0 is greedy.',
                   lower_bound=0.0, flag_values=FLAGS)
flags.DEFINE_integer('top_k', 0, 'Sample among the k likeliest tokens; 0: all.',
                     lower_bound=0, flag_values=FLAGS)
flags.DEFINE_float('top_p', 1.0, 'Nucleus: smallest set with this much '
                   'probability; 1: all.', flag_values=FLAGS)
flags.DEFINE_integer('seed', 0, 'Sampling seed (same seed, same text).', flag_values=FLAGS)
flags.DEFINE_bool('stream', False, 'Print tokens as they are generated (prompts '
                  'run one at a time).', flag_values=FLAGS)
flags.DEFINE_bool('fill_mask', False, 'An encoder run: rank completions for <mask> '
                  'in --text=... (the flags of python -m llm_jax.fill_mask).',
                  flag_values=FLAGS)
flags.mark_flag_as_required('workdir', flag_values=FLAGS)


def _expand(text: str) -> str:
  return text.replace('\\n', '\n').replace('\\t', '\t')


def _read_prompts(run) -> tuple[list[str | None], list[list[int]]]:
  """(display text or None, token ids) of every prompt the flags give."""
  texts = [_expand(p) for p in FLAGS.prompt]
  if FLAGS.prompts_file:
    try:
      with open(FLAGS.prompts_file, encoding='utf-8') as f:
        texts += [_expand(line.rstrip('\n')) for line in f if line.strip()]
    except OSError as e:
      raise UserError(f'Cannot read --prompts_file={FLAGS.prompts_file}: '
                      f'{e.strerror}. Pass a text file, one prompt a line.') from None
  if texts and run.tokenizer is None:
    raise UserError(f'{run.workdir} has no tokenizer.model, so text prompts '
                    'cannot be encoded; pass --prompt_ids=1,2,3 instead.')
  ids = [run.tokenizer.encode(t) for t in texts]
  for spec in FLAGS.prompt_ids:
    try:
      ids.append([int(x) for x in spec.split(',') if x.strip()])
    except ValueError:
      raise UserError(f'--prompt_ids={spec!r} is not a comma-separated list of '
                      'integers, e.g. --prompt_ids=5,17,9.') from None
    texts.append(None)
  if not ids:
    raise UserError('No prompt given. Pass --prompt=TEXT, --prompts_file=FILE or '
                    '--prompt_ids=1,2,3.')
  return texts, ids


def _show(run, ids: list[int]) -> str:
  return run.tokenizer.decode(ids) if run.tokenizer is not None else str(ids)


def _stream_one(run, text, ids, kw) -> None:
  """Prints one prompt's continuation token by token."""
  sys.stdout.write(text if text is not None else f'{ids} ->')
  got: list[int] = []
  shown = ['']

  def emit(now: str) -> None:
    # Print only what extends the text already shown; a piece whose UTF-8
    # bytes are incomplete (byte fallback) decodes as U+FFFD until the rest
    # arrives, so trailing replacement characters wait.
    if now.startswith(shown[0]):
      sys.stdout.write(now[len(shown[0]):])
      sys.stdout.flush()
      shown[0] = now

  def on_token(j, tokens_b, counts_b):
    if int(counts_b[0]) > int(j):
      got.append(int(tokens_b[0]))
      if run.tokenizer is None:
        sys.stdout.write(f' {got[-1]}')
        sys.stdout.flush()
      else:
        emit(_show(run, got).rstrip('\ufffd'))

  decode.generate_for_run(run, [ids], on_token=on_token, **kw)
  if run.tokenizer is not None:
    emit(_show(run, got))
  sys.stdout.write('\n')


def _main() -> None:
  if not 0 < FLAGS.top_p <= 1:
    raise UserError(f'--top_p={FLAGS.top_p} is out of range: 0 < top_p <= 1.')
  run = workdir.load(FLAGS.workdir, FLAGS.step)
  texts, prompts = _read_prompts(run)
  kw = dict(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
            top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed)
  decode.check_prompts(prompts, run.model_cfg.max_len, run.model_cfg.vocab_size)
  if FLAGS.stream:
    for text, ids in zip(texts, prompts):
      _stream_one(run, text, ids, kw)
    return
  out, counts = decode.generate_for_run(run, prompts, **kw)
  for row, (text, ids) in enumerate(zip(texts, prompts)):
    new = out[row, :counts[row]].tolist()
    if text is None:
      print(f'{ids} -> {new}')
    else:
      print(f'--- prompt {row + 1}\n{text}{_show(run, new)}')


def main(argv: list[str] | None = None):
  """Runs the command on ``argv`` (default: the process's arguments)."""
  argv = sys.argv[1:] if argv is None else argv
  if '--fill_mask' in argv:
    # Encoders: the fill_mask command, handed over as a process (commands do
    # not import each other), with its own flags.
    os.execv(sys.executable, [sys.executable, '-m', 'llm_jax.fill_mask',
                              *(a for a in argv if a != '--fill_mask')])
  return cli.run(_main, FLAGS, argv, doc=__doc__, prog=PROG)


if __name__ == '__main__':
  main()
