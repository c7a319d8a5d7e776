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

import sys

from absl import app, flags, logging

from llm_jax import decode
from llm_jax import cli
from llm_jax.errors import UserError

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defines the CLI's flags.

  Only when run as a program: importing this module as a library must not
  claim flag names that other CLIs define too.
  """
  flags.DEFINE_string('workdir', None, 'The run directory to load.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: newest).')
  flags.DEFINE_multi_string('prompt', [], 'Prompt text; repeatable.')
  flags.DEFINE_string('prompts_file', None, 'File, one prompt a line.')
  flags.DEFINE_multi_string('prompt_ids', [], 'A prompt as comma-separated token ids.')
  flags.DEFINE_integer('max_new_tokens', 64, 'New tokens per prompt at most.')
  flags.DEFINE_float('temperature', 0.8, 'Sampling temperature; 0 is greedy.')
  flags.DEFINE_integer('top_k', 0, 'Sample among the k likeliest tokens; 0: all.')
  flags.DEFINE_float('top_p', 1.0, 'Nucleus: smallest set with this much '
                     'probability; 1: all.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed (same seed, same text).')
  flags.DEFINE_bool('stream', False, 'Print tokens as they are generated (prompts '
                    'run one at a time).')


# The library half lives in decode.py (export and bench use it without this
# CLI's flags); these names are this module's public API too.
check_prompts = decode.check_prompts
generate_ids = decode.generate_for_run
prompt_buckets = decode.prompt_buckets


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

  generate_ids(run, [ids], on_token=on_token, **kw)
  if run.tokenizer is not None:
    emit(_show(run, got))
  sys.stdout.write('\n')


def main(argv) -> None:
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    cli.fail(f'Unexpected arguments: {" ".join(argv[1:])}. Flags look like --prompt=TEXT.')
  if not FLAGS.workdir:
    cli.fail('No --workdir given. Pass the directory of a training run.')
  try:
    for name, value, ok in (('max_new_tokens', FLAGS.max_new_tokens, FLAGS.max_new_tokens >= 1),
                            ('temperature', FLAGS.temperature, FLAGS.temperature >= 0),
                            ('top_p', FLAGS.top_p, 0 < FLAGS.top_p <= 1)):
      if not ok:
        raise UserError(f'--{name}={value} is out of range (max_new_tokens >= 1, '
                        'temperature >= 0, 0 < top_p <= 1).')
    from llm_jax import workdir  # pylint: disable=g-import-not-at-top
    run = workdir.load(FLAGS.workdir, FLAGS.step)
    texts, prompts = _read_prompts(run)
    kw = dict(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
              top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed)
    check_prompts(prompts, run.model_cfg.max_len, run.model_cfg.vocab_size)
    if FLAGS.stream:
      for text, ids in zip(texts, prompts):
        _stream_one(run, text, ids, kw)
      return
    out, counts = generate_ids(run, prompts, **kw)
    for row, (text, ids) in enumerate(zip(texts, prompts)):
      new = out[row, :counts[row]].tolist()
      if text is None:
        print(f'{ids} -> {new}')
      else:
        print(f'--- prompt {row + 1}\n{text}{_show(run, new)}')
  except UserError as e:
    cli.fail(str(e))




if __name__ == '__main__':
  if '--fill_mask' in sys.argv[1:]:
    # Encoders: rank completions for <mask> (llm_jax/fill_mask.py has the flags).
    from llm_jax import fill_mask  # pylint: disable=g-import-not-at-top
    fill_mask.main([a for a in sys.argv[1:] if a != '--fill_mask'])
    sys.exit(0)
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
