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

import argparse
import sys

import numpy as np

from llm_jax import cli
from llm_jax.errors import UserError


def fill_mask(run, text: str, *, top_k: int = 5,
              candidates: list[str] | None = None) -> list[list[tuple[str, float]]]:
  """Ranked ``(piece, probability)`` for each ``<mask>`` in ``text``, in order.

  Args:
    run: a ``workdir.Run`` of an encoder.
    text: a sentence with at least one ``<mask>``.
    top_k: how many completions per mask.
    candidates: rank only these strings (each one token), not the vocabulary.

  Raises:
    UserError: not an encoder, no ``<mask>``, too long, or a candidate that is
      not one token.
  """
  import jax  # pylint: disable=g-import-not-at-top
  tok = run.tokenizer
  if run.model_cfg.causal or tok is None or tok.mask_id < 0:
    raise UserError(f'{run.workdir} is not an encoder run with a <mask> piece; '
                    "train one with --config=configs/mlm.py (model.kind='encoder').")
  ids = tok.encode(text)
  where = [i for i, t in enumerate(ids) if t == tok.mask_id]
  if not where:
    raise UserError(f'The text {text!r} has no <mask>; write <mask> where a word is missing.')
  if len(ids) > run.model_cfg.max_len:
    raise UserError(f'The text is {len(ids)} tokens, more than the model\'s '
                    f'{run.model_cfg.max_len}; shorten it.')
  logits_TV = run.model()(np.asarray([ids], np.int32))[0]
  probs_MV = np.asarray(jax.nn.softmax(logits_TV[np.asarray(where)], axis=-1), np.float64)
  if candidates:
    cand_ids = []
    for word in candidates:
      pieces = tok.encode(word)
      if len(pieces) != 1:
        raise UserError(f'The candidate {word!r} is {len(pieces)} tokens; each '
                        'candidate must be a single token of this tokenizer.')
      cand_ids.append(pieces[0])
    allowed = np.asarray(cand_ids)
  else:
    special = {tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id}
    allowed = np.asarray([i for i in range(tok.vocab_size) if i not in special])
  out = []
  for probs_V in probs_MV:
    order = allowed[np.argsort(-probs_V[allowed], kind='stable')][:top_k]
    out.append([(tok.decode([int(i)]), float(probs_V[i])) for i in order])
  return out


def fill_text(text: str, mask_piece: str, choices: list[str]) -> str:
  """``text`` with each ``mask_piece`` replaced by the matching choice."""
  parts = text.split(mask_piece)
  return ''.join(p + (choices[i] if i < len(choices) else '') for i, p in enumerate(parts))


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    cli.fail(f'{message}. See python -m llm_jax.fill_mask --help.')


def main(argv: list[str] | None = None) -> list[list[tuple[str, float]]]:
  p = _Parser(prog='python -m llm_jax.fill_mask', description=__doc__.split('\n\n')[0],
              formatter_class=argparse.RawDescriptionHelpFormatter,
              epilog=__doc__.split('\n\n', 1)[1])
  p.add_argument('--workdir', required=True, help='An encoder run directory.')
  p.add_argument('--text', required=True, help='A sentence with <mask> in it.')
  p.add_argument('--top_k', type=int, default=5, help='Completions per mask.')
  p.add_argument('--candidates', default='', help='Comma-separated words to rank instead.')
  p.add_argument('--step', type=int, default=None, help='Checkpoint step (default newest).')
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  from llm_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from llm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  try:
    if args.top_k < 1:
      raise UserError(f'--top_k={args.top_k} must be at least 1.')
    run = workdir_lib.load(args.workdir, args.step)
    ranked = fill_mask(run, args.text, top_k=args.top_k,
                       candidates=[c for c in args.candidates.split(',') if c] or None)
  except UserError as e:
    cli.fail(str(e))
  for n, choices in enumerate(ranked, 1):
    print(f'<mask> {n}:')
    for rank, (piece, prob) in enumerate(choices, 1):
      print(f'  {rank}. {piece!r:20} {prob:.4f}')
  print(fill_text(args.text, tokenizer_lib.MASK_PIECE, [c[0][0] for c in ranked]))
  return ranked


if __name__ == '__main__':
  main()
