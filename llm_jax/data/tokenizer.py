"""Tokenizers: SentencePiece here, Hugging Face ``tokenizers`` behind the same interface.

``load(path)`` reads either kind: a SentencePiece ``.model`` gives a
``Tokenizer``; a ``tokenizer.json``, ``vocab.txt`` (WordPiece) or
``vocab.json`` + ``merges.txt`` (byte-level BPE), or a Hugging Face directory,
gives an ``hf_tokenizer.HFTokenizer``. Both have ``encode``/``decode``, the
special ids (pad, unk, bos, eos, mask, cls, sep), ``model_bytes``, ``files``,
``sha256``, ``vocab_size`` and ``with_specials`` (the sequence layout for
one text or a pair), so nothing downstream asks which it has. ``train``
trains the kind ``config.tokenizer.kind`` names.

SentencePiece models trained here are lossless:

``decode(encode(text)) == text`` for any text, including code. Three settings
make that so:

* Normalisation is the identity, extra whitespace is kept and no dummy
  prefix space is added, so indentation and leading spaces survive.
* ``byte_fallback``: a character outside the vocabulary becomes its UTF-8
  bytes (``<0x..>`` pieces), never ``unk``.
* ``\\n`` is a user-defined piece. SentencePiece trains on *lines* (the
  sentence iterator is split at newlines), so without it a newline would
  never be learned and could only be encoded through byte fallback.

Ids: pad 0, unk 1, bos 2, eos 3. A tokenizer for an encoder (masked LM) also
has a ``<mask>`` piece (``MASK_PIECE``), right after ``\\n``.
"""

import hashlib
import io
import os
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from llm_jax.core.errors import UserError
from llm_jax.data import hf_tokenizer

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ('bpe', 'unigram')
MASK_PIECE = '<mask>'  # The masked-LM placeholder (encoders only).
SENTENCEPIECE_FILE = 'tokenizer.model'
# config.tokenizer.kind: SentencePiece (BPE or unigram, model_type), or a
# Hugging Face byte-level BPE (RoBERTa/GPT-2 style) or WordPiece (BERT).
KINDS = ('sentencepiece', 'bytelevel_bpe', 'wordpiece')
# The file a tokenizer of each kind lives in (a run holds one of them).
FILE_NAMES = (SENTENCEPIECE_FILE, hf_tokenizer.TOKENIZER_JSON)
# SentencePiece samples input_sentence_size lines with its own generator;
# a fixed seed makes the tokenizer a function of the documents alone.
_SPM_RANDOM_SEED = 20240101
# SentencePiece skips training lines longer than max_sentence_length bytes
# (default 4192); long lines (minified JSON, data tables) are cut into chunks
# of this many characters (at most 4 bytes each) instead.
_MAX_LINE_CHARS = 1024

# Settings that are part of what "a trained tokenizer" means here; the cache
# key in shards.py includes them, so changing one retrains.
TRAINER_OPTIONS = dict(
    byte_fallback=True,
    hard_vocab_limit=False,  # A tiny corpus gets fewer pieces, not an error.
    split_digits=True,
    remove_extra_whitespaces=False,
    normalization_rule_name='identity',
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,  # Indentation runs become pieces.
    user_defined_symbols=['\n'],
    shuffle_input_sentence=True,
    pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
)


def training_lines(docs: Iterable[str]) -> Iterator[str]:
  """Yields the non-empty lines of the documents, long ones in chunks."""
  for doc in docs:
    for line in doc.split('\n'):
      for start in range(0, len(line), _MAX_LINE_CHARS):
        yield line[start:start + _MAX_LINE_CHARS]


def train_tokenizer(docs: list[str], model_path_prefix: str, tok_cfg,
                    num_threads: int, *, extra_symbols: Sequence[str] = ()) -> str:
  """Trains a SentencePiece model on ``docs`` and writes ``<prefix>.model``.

  The file appears atomically (written under a temporary name, then
  renamed), so a crash never leaves a truncated model behind.

  Args:
    docs: Training documents.
    model_path_prefix: Path without the ``.model`` suffix.
    tok_cfg: ``config.tokenizer`` (vocab_size, model_type,
      character_coverage, input_sentence_size).
    num_threads: Trainer threads.
    extra_symbols: more user-defined pieces after ``\\n``, e.g.
      ``(MASK_PIECE,)`` for an encoder; each is one token wherever it appears.

  Returns:
    The path of the written ``.model`` file.

  Raises:
    UserError: the settings do not fit the corpus (e.g. vocab too small).
  """
  if tok_cfg.model_type not in MODEL_TYPES:
    raise UserError(f'tokenizer.model_type={tok_cfg.model_type!r} is not one '
                    f'of {", ".join(MODEL_TYPES)}')
  model = io.BytesIO()
  spm.set_random_generator_seed(_SPM_RANDOM_SEED)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_lines(docs), model_writer=model,
        model_type=tok_cfg.model_type, vocab_size=tok_cfg.vocab_size,
        character_coverage=tok_cfg.character_coverage,
        input_sentence_size=tok_cfg.input_sentence_size,
        num_threads=max(1, num_threads), minloglevel=2,
        **_with_symbols(TRAINER_OPTIONS, extra_symbols))
  except RuntimeError as e:
    message = ' '.join(str(e).split())
    raise UserError(f'SentencePiece could not train a tokenizer with '
                    f'tokenizer.vocab_size={tok_cfg.vocab_size}, '
                    f'model_type={tok_cfg.model_type!r}: {message}') from None
  path = model_path_prefix + '.model'
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp_path = f'{path}.tmp-{os.getpid()}-{time.monotonic_ns()}'
  with open(tmp_path, 'wb') as f:
    f.write(_without_run_settings(model.getvalue()))
  os.replace(tmp_path, path)
  return path


def _with_symbols(options: dict, extra_symbols: Sequence[str]) -> dict:
  if not extra_symbols:
    return options
  return dict(options, user_defined_symbols=[
      *options['user_defined_symbols'], *extra_symbols])


def _without_run_settings(model_bytes: bytes) -> bytes:
  """Clears settings of the training *run* that the model file records.

  The trainer spec stored in the model includes ``num_threads``; clearing it
  makes the file (and so its sha256) the same however many threads trained
  it, as the pieces already are for BPE.
  """
  try:
    # pylint: disable-next=g-import-not-at-top
    from sentencepiece import sentencepiece_model_pb2
  except ImportError:  # Needs protobuf; the hash is then merely thread-bound.
    return model_bytes
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_bytes)
  proto.trainer_spec.ClearField('num_threads')
  return proto.SerializeToString(deterministic=True)


# What to do about a tokenizer.path that does not load (the user's own file).
CONFIGURED_PATH_FIX = ('point --config.tokenizer.path at a SentencePiece .model file or a '
                       "Hugging Face tokenizer.json, or set it to '' to train one on the data")


def load(path: str, fix: str = CONFIGURED_PATH_FIX):
  """A ``Tokenizer`` (``.model``) or an ``HFTokenizer`` (anything else)."""
  if os.path.expanduser(path).endswith('.model'):
    return Tokenizer.load(path, fix)
  return hf_tokenizer.load(path)


def file_name(kind: str) -> str:
  """The file a tokenizer of ``config.tokenizer.kind`` is kept in."""
  return SENTENCEPIECE_FILE if kind == 'sentencepiece' else hf_tokenizer.TOKENIZER_JSON


def train(docs: list[str], model_path_prefix: str, tok_cfg, num_threads: int, *,
          encoder: bool = False) -> str:
  """Trains the tokenizer ``tok_cfg.kind`` names; returns the file's path.

  An encoder's tokenizer also gets a mask token (``<mask>``, or ``[MASK]``
  for WordPiece).
  """
  if tok_cfg.kind not in KINDS:
    raise UserError(f'tokenizer.kind={tok_cfg.kind!r} is not one of '
                    f'{", ".join(KINDS)}')
  if tok_cfg.kind == 'sentencepiece':
    return train_tokenizer(docs, model_path_prefix, tok_cfg, num_threads,
                           extra_symbols=(MASK_PIECE,) if encoder else ())
  return hf_tokenizer.train(docs, model_path_prefix, tok_cfg, encoder=encoder)


class Tokenizer:
  """A loaded SentencePiece model with the ids and hash the trainer needs."""

  kind = 'sentencepiece'
  file_name = SENTENCEPIECE_FILE

  def __init__(self, path: str, model_bytes: bytes,
               processor: spm.SentencePieceProcessor):
    self._path = path
    self._model_bytes = model_bytes
    self._sp = processor
    self._sha256 = hashlib.sha256(model_bytes).hexdigest()

  @classmethod
  def from_bytes(cls, model_bytes: bytes, path: str = '') -> 'Tokenizer':
    """A tokenizer from a serialized model (e.g. a merged one not yet written)."""
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(model_bytes)
    return cls(path, model_bytes, processor)

  @classmethod
  def load(cls, path: str, fix: str = CONFIGURED_PATH_FIX) -> 'Tokenizer':
    """Loads a ``.model`` file.

    Args:
      path: the file.
      fix: what the user should do if it cannot be loaded (the default suits
        ``tokenizer.path``; a run's own copy or a cache entry say otherwise).

    Raises:
      UserError: the file is missing or not a SentencePiece model.
    """
    try:
      with open(path, 'rb') as f:
        model_bytes = f.read()
    except OSError as e:
      raise UserError(f'cannot read the tokenizer model {path}: {e.strerror}; '
                      f'{fix}') from None
    processor = spm.SentencePieceProcessor()
    try:
      processor.LoadFromSerializedProto(model_bytes)
    except (RuntimeError, OSError):
      processor = None
    if processor is None or processor.get_piece_size() == 0:
      raise UserError(f'{path} is not a SentencePiece model (a damaged file, or '
                      'another format such as a Hugging Face tokenizer.json); '
                      f'{fix}')
    return cls(path, model_bytes, processor)

  @property
  def path(self) -> str:
    return self._path

  @property
  def sha256(self) -> str:
    """Hex sha256 of the model file's bytes."""
    return self._sha256

  @property
  def model_bytes(self) -> bytes:
    """The serialized model (e.g. for a TF text op in an export)."""
    return self._model_bytes

  def files(self) -> dict[str, bytes]:
    """The files a run (or an export) keeps: ``tokenizer.model``."""
    return {SENTENCEPIECE_FILE: self._model_bytes}

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def mask_id(self) -> int:
    """The id of the ``<mask>`` piece, or -1 if this tokenizer has none."""
    token_id = self._sp.piece_to_id(MASK_PIECE)
    return token_id if self._sp.id_to_piece(token_id) == MASK_PIECE else -1

  @property
  def cls_id(self) -> int:
    """A sequence's first token for a task head: bos."""
    return self.bos_id

  @property
  def sep_id(self) -> int:
    """The token that ends each text of a sequence or pair: eos."""
    return self.eos_id

  @property
  def mask_token(self) -> str | None:
    return MASK_PIECE if self.mask_id >= 0 else None

  @property
  def special_ids(self) -> tuple[int, ...]:
    """Control pieces and the mask: never masked, drawn or ranked as words."""
    ids = [i for i in range(self.vocab_size) if self._sp.is_control(i)]
    return tuple(sorted({*ids, self.unk_id, self.mask_id} - {-1}))

  def template(self, pair: bool) -> tuple[tuple, ...]:
    """``bos A eos`` or ``bos A eos B eos`` (B and its eos of type 1)."""
    one = ((self.bos_id, 0), ('A', 0), (self.eos_id, 0))
    return one + (('B', 1), (self.eos_id, 1)) if pair else one

  def with_specials(self, a, b=None):
    """``(ids, type_ids, sequence_ids)`` of one text or a pair, specials added."""
    return hf_tokenizer.fill_template(self.template(b is not None), a, b)

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` (no bos/eos added)."""
    return self._sp.encode(text, out_type=int)

  def encode_batch(self, texts: Sequence[str],
                   num_threads: int) -> list[list[int]]:
    """Token ids of each text, encoded by ``num_threads`` native threads."""
    return self._sp.encode(list(texts), out_type=int,
                           num_threads=max(1, num_threads))

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and each piece's ``(start, end)`` character offsets in ``text``."""
    proto = self._sp.encode(text, return_type='proto')
    # SentencePiece counts UTF-8 bytes; a character starts at starts[i].
    starts = np.cumsum([0] + [len(ch.encode('utf-8')) for ch in text])
    begin = np.searchsorted(starts, [p.begin for p in proto.pieces], side='right') - 1
    end = np.searchsorted(starts, [p.end for p in proto.pieces], side='left')
    return [p.id for p in proto.pieces], list(zip(begin.tolist(), end.tolist()))

  def decode(self, ids) -> str:
    """Text of ``ids``; ids outside [0, vocab_size) decode as unk.

    Control ids (pad, bos, eos) decode to nothing.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids = np.where((ids >= 0) & (ids < self.vocab_size), ids, self.unk_id)
    return self._sp.decode(ids.tolist())

  def __repr__(self) -> str:
    return (f'Tokenizer({self._path!r}, vocab_size={self.vocab_size}, '
            f'sha256={self._sha256[:12]})')


def extend_tokenizer(model_bytes: bytes, texts: Iterable[str], num_pieces: int, *,
                     character_coverage: float = 0.9995,
                     num_threads: int = 2) -> tuple[bytes, list[str]]:
  """Appends pieces learnt from ``texts`` that the model lacks; old ids stay.

  A SentencePiece model of the base model's type is trained on ``texts`` with
  this module's settings; its pieces the base lacks are appended to the base
  ModelProto, single characters first (a BPE merge can only build a piece
  from characters the vocabulary has), then the rest in the order the new
  model ranks them. Nothing before the old last id moves, so old ids encode
  and decode as before; new text can use the new pieces.

  Args:
    model_bytes: the serialized base model.
    texts: the new documents.
    num_pieces: how many pieces to add at most.
    character_coverage: share of the new text's characters to cover.
    num_threads: trainer threads.

  Returns:
    (the merged model's bytes, the pieces added in id order).

  Raises:
    UserError: the base is not a model, or nothing could be learnt.
  """
  # pylint: disable-next=g-import-not-at-top
  from sentencepiece import sentencepiece_model_pb2 as model_pb2
  if num_pieces < 1:
    raise UserError(f'num_pieces={num_pieces} must be at least 1.')
  base = model_pb2.ModelProto()
  base.ParseFromString(model_bytes)
  normal = model_pb2.ModelProto.SentencePiece.NORMAL
  model_type = {1: 'unigram', 2: 'bpe'}.get(base.trainer_spec.model_type, 'bpe')
  options = dict(TRAINER_OPTIONS, byte_fallback=False)  # Only pieces wanted.
  texts = list(texts)
  # Room for every character as well (the trainer refuses a vocabulary
  # smaller than the characters it must cover) and the control pieces.
  num_chars = len(set(''.join(texts)))
  new = io.BytesIO()
  spm.set_random_generator_seed(_SPM_RANDOM_SEED)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_lines(texts), model_writer=new,
        model_type=model_type, vocab_size=num_pieces + num_chars + 8,
        character_coverage=character_coverage, num_threads=max(1, num_threads),
        minloglevel=2, **options)
  except RuntimeError as e:
    raise UserError(f'SentencePiece could not learn pieces from the new text: '
                    f'{" ".join(str(e).split())}') from None
  learnt = model_pb2.ModelProto()
  learnt.ParseFromString(new.getvalue())
  have = {p.piece for p in base.pieces}
  fresh = [p for p in learnt.pieces if p.type == normal and p.piece not in have]
  # Characters first, each group in the new model's order.
  fresh = ([p for p in fresh if len(p.piece) == 1] +
           [p for p in fresh if len(p.piece) > 1])[:num_pieces]
  if not fresh:
    raise UserError('The new text adds no piece the tokenizer lacks; give text '
                    'in the new language or domain.')
  floor = min((p.score for p in base.pieces if p.type == normal), default=0.0)
  for rank, p in enumerate(fresh):
    # BPE merges by score: below every old piece, so old text encodes as
    # before wherever it did not need a new piece. Unigram keeps the new
    # model's log-probabilities, which are on the base's scale.
    score = floor - 1.0 - rank if model_type == 'bpe' else p.score
    base.pieces.add(piece=p.piece, score=score, type=normal)
  return base.SerializeToString(deterministic=True), [p.piece for p in fresh]
