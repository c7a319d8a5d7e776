"""Cleaning and splitting documents: normalise, drop duplicates and short ones.

Both steps are pure functions of the document texts, so the same raw corpus
always gives the same cleaned corpus and the same train/validation split
(which is what makes the content hash a good cache key).
"""

import dataclasses
import hashlib
import re
import unicodedata
from collections.abc import Iterable

from llm_jax.core.errors import UserError

# C0 and C1 control characters except \t and \n (\r is normalised first).
# Format characters (category Cf, e.g. the zero-width joiner inside emoji
# sequences) are meaningful and kept.
_CONTROL_RE = re.compile('[\x00-\x08\x0b-\x1f\x7f-\x9f]')
_NEWLINE_RE = re.compile('\r\n?')


@dataclasses.dataclass
class CleanStats:
  """What cleaning did, for logs, errors and the manifest."""
  input: int = 0
  kept: int = 0
  duplicates: int = 0
  too_short: int = 0
  control_chars_removed: int = 0
  min_chars: int = 0

  def summary(self) -> str:
    """One line for the log."""
    return (f'Cleaning kept {self.kept} of {self.input} documents: '
            f'{self.duplicates} exact duplicates and {self.too_short} shorter '
            f'than {self.min_chars} characters dropped, '
            f'{self.control_chars_removed} control characters removed')


def normalize_text(text: str) -> tuple[str, int]:
  """NFC, ``\\r\\n``/``\\r`` -> ``\\n``, control characters removed.

  Returns:
    The normalised text and how many control characters were removed.
  """
  text = _NEWLINE_RE.sub('\n', text)
  text, removed = _CONTROL_RE.subn('', text)
  return unicodedata.normalize('NFC', text), removed


def clean_documents(docs: Iterable[str],
                    min_chars: int) -> tuple[list[str], CleanStats]:
  """Normalises documents and drops exact duplicates and short ones.

  Args:
    docs: Raw document texts, in order (consumed once, so a stream is fine).
    min_chars: Documents with fewer characters than this, after
      normalisation, are dropped. Empty documents are always dropped.

  Returns:
    The kept documents in their original order (first copy of duplicates),
    and the counts.
  """
  stats = CleanStats(min_chars=min_chars)
  kept, seen = [], set()
  for doc in docs:
    stats.input += 1
    doc, removed = normalize_text(doc)
    stats.control_chars_removed += removed
    if len(doc) < max(min_chars, 1):
      stats.too_short += 1
    elif doc in seen:
      stats.duplicates += 1
    else:
      seen.add(doc)
      kept.append(doc)
  stats.kept = len(kept)
  return kept, stats


def doc_hash_fraction(doc: str) -> float:
  """A document's sha256 as a number in [0, 1): its place in the split."""
  digest = hashlib.sha256(doc.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64


def split_by_hash(docs: list[str],
                  val_fraction: float) -> tuple[list[str], list[str]]:
  """Splits documents into train and validation by their content hash.

  A document lands in validation when its hash fraction is below
  ``val_fraction``, so its split does not depend on its position or on the
  other documents, and adding documents never moves existing ones. With
  ``val_fraction > 0`` and at least two documents each split gets at least
  one document (the one whose hash is closest to the boundary moves); a
  single document always goes to train.

  Args:
    docs: Cleaned documents.
    val_fraction: Expected share of documents held out, in [0, 1).

  Returns:
    ``(train_docs, val_docs)``, each in the original order.

  Raises:
    UserError: val_fraction is outside [0, 1).
  """
  if not 0 <= val_fraction < 1:
    raise UserError(f'data.val_fraction={val_fraction} must be in [0, 1), '
                    'e.g. 0.02')
  fractions = [doc_hash_fraction(d) for d in docs]
  is_val = [f < val_fraction for f in fractions]
  if val_fraction > 0 and len(docs) >= 2 and not any(is_val):
    is_val[min(range(len(docs)), key=fractions.__getitem__)] = True
  if docs and all(is_val):
    is_val[max(range(len(docs)), key=fractions.__getitem__)] = False
  train = [d for d, v in zip(docs, is_val) if not v]
  val = [d for d, v in zip(docs, is_val) if v]
  return train, val
