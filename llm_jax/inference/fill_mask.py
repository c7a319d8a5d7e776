"""Fill-mask with an encoder: rank the vocabulary (or candidates) at each ``<mask>``.

Each ``<mask>`` in the text is one token; the encoder (``model.kind=
'encoder'``) sees the whole sentence at once and its softmax at that position
ranks the vocabulary (special pieces left out), or only the given candidate
words (each must be one token). ``<mask>`` also stands for a tokenizer's own
mask token (BERT's ``[MASK]``); a Hugging Face tokenizer adds the special
tokens its models expect around the text (``[CLS] ... [SEP]``, ``<s> ... </s>``).
"""

import numpy as np

from llm_jax.core.errors import UserError


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
  ids = tok.encode(text.replace('<mask>', tok.mask_token))
  if tok.kind != 'sentencepiece':
    ids = tok.with_specials(ids)[0]
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
    special = {tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id,
               *tok.special_ids}
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
