"""Hugging Face tokenizers (the ``tokenizers`` library) behind the one tokenizer interface.

``HFTokenizer`` has the methods and properties of the SentencePiece
``tokenizer.Tokenizer`` (encode, decode, the special ids, ``model_bytes``,
``sha256``, ``vocab_size``, ``files``), so the pipeline, decoding, evaluation
and export take either; ``tokenizer.load`` picks the class from the file.

It reads what Hugging Face model directories hold:

* ``tokenizer.json``: any BPE (GPT-2, LLaMA-3, Qwen2, RoBERTa: byte-level)
  or WordPiece (BERT) tokenizer, with its normaliser, pre-tokeniser,
  post-processor (``[CLS] a [SEP] b [SEP]``, ``<s> a </s></s> b </s>``) and
  added tokens, exactly as transformers' fast tokenizers run it;
* ``vocab.txt`` (BERT WordPiece; ``do_lower_case`` from tokenizer_config.json);
* ``vocab.json`` + ``merges.txt`` (GPT-2 / RoBERTa byte-level BPE).

Which token is bos, eos, pad, unk, mask, cls and sep comes from
``tokenizer_config.json`` (or ``special_tokens_map.json``) beside the file;
roles it does not name are found by their usual spellings (``_USUAL``). A run
keeps ``tokenizer.json`` and a ``tokenizer_config.json`` naming the roles, so
the pair loads the same way anywhere (transformers' ``AutoTokenizer`` too).

``train`` learns a byte-level BPE (lossless: ``decode(encode(t)) == t``) or
a WordPiece (BERT's normalisation: lowercase, accents stripped, CJK characters
and punctuation split) vocabulary from documents.
"""

import collections
import hashlib
import heapq
import json
import os
import re
from collections.abc import Sequence

import numpy as np

from llm_jax.core import files
from llm_jax.core.errors import UserError

TOKENIZER_JSON = 'tokenizer.json'
CONFIG_JSON = 'tokenizer_config.json'
_SPECIAL_MAP = 'special_tokens_map.json'
# tokenizer.json model types read here (Unigram and WordLevel are not).
MODEL_TYPES = ('BPE', 'WordPiece')
ROLES = ('bos', 'eos', 'unk', 'pad', 'mask', 'cls', 'sep')
# A role tokenizer_config.json does not name: the first of these spellings
# the vocabulary has (GPT-2 uses <|endoftext|> for bos, eos and unk).
_USUAL = {
    'bos': ('<s>', '<|begin_of_text|>', '[CLS]', '<|endoftext|>'),
    'eos': ('</s>', '<|end_of_text|>', '<|endoftext|>', '[SEP]'),
    'unk': ('<unk>', '[UNK]', '<|endoftext|>'),
    'pad': ('<pad>', '[PAD]', '<|finetune_right_pad_id|>'),
    'mask': ('<mask>', '[MASK]'),
    'cls': ('[CLS]', '<s>'),
    'sep': ('[SEP]', '</s>'),
}
# Special tokens of the kinds trained here, in id order.
BYTELEVEL_SPECIALS = ('<s>', '<pad>', '</s>', '<unk>')
WORDPIECE_SPECIALS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]')


def _tokenizers():
  import tokenizers  # pylint: disable=g-import-not-at-top
  return tokenizers


class HFTokenizer:
  """A ``tokenizers.Tokenizer`` with its special-token roles and hash."""

  kind = 'huggingface'
  file_name = TOKENIZER_JSON

  def __init__(self, path: str, json_bytes: bytes, roles: dict, tk):
    self._path = path
    self._json = json_bytes
    self._tk = tk
    vocab = tk.get_vocab(with_added_tokens=True)
    self._vocab_size = max(vocab.values()) + 1 if vocab else 0
    self._roles = {r: roles.get(r) if roles.get(r) in vocab else None for r in ROLES}
    self._config = _canonical_config(self._roles)
    self._sha256 = hashlib.sha256(json_bytes + b'\n' + self._config).hexdigest()
    self._templates = {}

  @classmethod
  def load(cls, path: str) -> 'HFTokenizer':
    """Reads a tokenizer.json, a vocab.txt, a vocab.json or a directory of them."""
    return load(path)

  # ---- The interface shared with the SentencePiece Tokenizer.

  @property
  def path(self) -> str:
    return self._path

  @property
  def sha256(self) -> str:
    """Hex sha256 of tokenizer.json and the special-token roles."""
    return self._sha256

  @property
  def model_bytes(self) -> bytes:
    """The tokenizer.json bytes."""
    return self._json

  def files(self) -> dict[str, bytes]:
    """The files a run (or an export) keeps: tokenizer.json and its roles."""
    return {TOKENIZER_JSON: self._json, CONFIG_JSON: self._config}

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  def _id(self, role: str) -> int:
    token = self._roles[role]
    return -1 if token is None else self._tk.token_to_id(token)

  pad_id = property(lambda self: self._id('pad'))
  unk_id = property(lambda self: self._id('unk'))
  bos_id = property(lambda self: self._id('bos'))
  eos_id = property(lambda self: self._id('eos'))
  mask_id = property(lambda self: self._id('mask'),
                     doc='The id of the mask token, or -1 if there is none.')
  cls_id = property(lambda self: self._id('cls'))
  sep_id = property(lambda self: self._id('sep'))

  @property
  def mask_token(self) -> str | None:
    return self._roles['mask']

  @property
  def special_ids(self) -> tuple[int, ...]:
    """Every special (added, special) token and every role's id."""
    ids = {i for i, t in self._tk.get_added_tokens_decoder().items() if t.special}
    ids |= {self._id(r) for r in ROLES}
    return tuple(sorted(ids - {-1}))

  def id_to_piece(self, token_id: int) -> str:
    return self._tk.id_to_token(int(token_id)) or ''

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` (no special tokens added)."""
    return self._tk.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str], num_threads: int) -> list[list[int]]:
    """Token ids of each text (the library's own threads encode them)."""
    del num_threads  # tokenizers sizes its pool itself (RAYON_NUM_THREADS).
    return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and each token's ``(start, end)`` character offsets in ``text``."""
    e = self._tk.encode(text, add_special_tokens=False)
    return e.ids, [tuple(o) for o in e.offsets]

  def decode(self, ids) -> str:
    """Text of ``ids``; special tokens decode to nothing, unknown ids as unk."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    known = (ids >= 0) & (ids < self.vocab_size)
    ids = np.where(known, ids, self.unk_id) if self.unk_id >= 0 else ids[known]
    return self._tk.decode(ids.tolist(), skip_special_tokens=True)

  def template(self, pair: bool) -> tuple[tuple, ...]:
    """The post-processor's layout: ``('A'|'B'|special id, type id)`` items."""
    if pair not in self._templates:
      enc = self._tk.encode('a', 'b' if pair else None, add_special_tokens=True)
      items = []
      for token, seq, type_id, special in zip(enc.ids, enc.sequence_ids, enc.type_ids,
                                              enc.special_tokens_mask):
        if special or seq is None:
          items.append((token, type_id))
        elif not items or items[-1][0] != 'AB'[seq]:
          items.append(('AB'[seq], type_id))
      self._templates[pair] = tuple(items)
    return self._templates[pair]

  def with_specials(self, a: Sequence[int], b: Sequence[int] | None = None):
    """``(ids, type_ids, sequence_ids)`` of one text or a pair, specials added."""
    return fill_template(self.template(b is not None), a, b)

  def __repr__(self) -> str:
    return (f'HFTokenizer({self._path!r}, vocab_size={self.vocab_size}, '
            f'sha256={self._sha256[:12]})')


def fill_template(template, a: Sequence[int], b: Sequence[int] | None):
  """Ids, type ids and sequence ids (0: a, 1: b, -1: special) of a template."""
  ids, types, seqs = [], [], []
  for item, type_id in template:
    part = a if item == 'A' else b if item == 'B' else [item]
    ids.extend(part)
    types.extend([type_id] * len(part))
    seqs.extend([0 if item == 'A' else 1 if item == 'B' else -1] * len(part))
  return ids, types, seqs


def _canonical_config(roles: dict) -> bytes:
  config = {'tokenizer_class': 'PreTrainedTokenizerFast'}
  config.update({f'{r}_token': roles[r] for r in ROLES})
  return (json.dumps(config, indent=2, sort_keys=True) + '\n').encode()


# ---- Loading.


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except OSError as e:
    raise UserError(f'Cannot read {path} ({e.strerror}).') from None
  except json.JSONDecodeError as e:
    raise UserError(f'{path} is not valid JSON ({e}).') from None


def _named_roles(directory: str) -> dict:
  """Roles tokenizer_config.json / special_tokens_map.json name (None kept)."""
  roles = {}
  for name in (_SPECIAL_MAP, CONFIG_JSON):  # The config wins where both name one.
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      continue
    config = _read_json(path)
    for role in ROLES:
      if f'{role}_token' in config:
        value = config[f'{role}_token']
        roles[role] = value.get('content') if isinstance(value, dict) else value
  return roles


def _roles_for(tk, named: dict) -> dict:
  vocab = tk.get_vocab(with_added_tokens=True)
  roles = {}
  for role in ROLES:
    if role in named:
      roles[role] = named[role]
    else:
      roles[role] = next((t for t in _USUAL[role] if t in vocab), None)
  return roles


def _tokenizer_config(directory: str) -> dict:
  path = os.path.join(directory, CONFIG_JSON)
  return _read_json(path) if os.path.exists(path) else {}


def load(path: str) -> HFTokenizer:
  """Loads a Hugging Face tokenizer from a directory or one of its files.

  Raises:
    UserError: missing, unreadable, or a tokenizer.json of a model type
      other than BPE and WordPiece.
  """
  path = os.path.expanduser(path)
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  if os.path.isdir(path):
    for name in (TOKENIZER_JSON, 'vocab.json', 'vocab.txt'):
      if os.path.exists(os.path.join(path, name)):
        path = os.path.join(path, name)
        break
    else:
      raise UserError(f'{path} has no tokenizer.json, vocab.json + merges.txt or '
                      'vocab.txt; point at a Hugging Face tokenizer directory.')
  if not os.path.exists(path):
    raise UserError(f'Cannot read tokenizer {path}: no such file; set '
                    '--config.tokenizer.path to a tokenizer.model, tokenizer.json '
                    "or vocab.txt, or to '' to train one.")
  name = os.path.basename(path)
  if name == 'vocab.txt':
    tk = _wordpiece_from_vocab(path, _tokenizer_config(directory))
  elif name == 'vocab.json':
    tk = _bytelevel_from_vocab(path, os.path.join(directory, 'merges.txt'),
                               _tokenizer_config(directory))
  else:
    tk = _from_json(path)
  json_bytes = tk.to_str().encode() if name in ('vocab.txt', 'vocab.json') else (
      open(path, 'rb').read())
  return HFTokenizer(path, json_bytes, _roles_for(tk, _named_roles(directory)), tk)


def _from_json(path: str):
  spec = _read_json(path)
  model_type = (spec.get('model') or {}).get('type') if isinstance(spec, dict) else None
  if model_type not in MODEL_TYPES:
    raise UserError(
        f'{path} is a tokenizer.json of model type {model_type!r}; llm_jax reads '
        'BPE (GPT-2, LLaMA-3, Qwen2, RoBERTa) and WordPiece (BERT) tokenizers.')
  try:
    return _tokenizers().Tokenizer.from_file(path)
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [''])[0][:200]
    raise UserError(f'{path} does not load as a tokenizers file ({first}).') from None


def _wordpiece_from_vocab(path: str, config: dict):
  """BERT's pipeline around a vocab.txt (as BertTokenizer builds it)."""
  impl = _tokenizers().implementations.BertWordPieceTokenizer
  tk = impl(path, lowercase=config.get('do_lower_case', True),
            strip_accents=config.get('strip_accents'),
            handle_chinese_chars=config.get('tokenize_chinese_chars', True))
  return tk._tokenizer  # pylint: disable=protected-access


def _bytelevel_from_vocab(path: str, merges: str, config: dict):
  """GPT-2's (or, with RoBERTa's class, RoBERTa's) pipeline around vocab + merges."""
  t = _tokenizers()
  if not os.path.exists(merges):
    raise UserError(f'{path} needs merges.txt beside it (byte-level BPE).')
  add_prefix_space = bool(config.get('add_prefix_space', False))
  tk = t.implementations.ByteLevelBPETokenizer(path, merges,
                                               add_prefix_space=add_prefix_space)
  tk = tk._tokenizer  # pylint: disable=protected-access
  if 'roberta' in str(config.get('tokenizer_class', '')).lower():
    tk.post_processor = t.processors.RobertaProcessing(
        ('</s>', tk.token_to_id('</s>')), ('<s>', tk.token_to_id('<s>')),
        add_prefix_space=add_prefix_space)
  specials = [t for t in (*_USUAL['bos'], *_USUAL['eos'], *_USUAL['unk'],
                          *_USUAL['pad'], *_USUAL['mask'])
              if tk.token_to_id(t) is not None]
  tk.add_special_tokens(sorted(set(specials)))
  return tk


# ---- Training.


def _train_wordpiece(docs: list[str], tok_cfg, specials: list[str]):
  """BERT's pipeline around a vocabulary learnt by ``learn_wordpiece``.

  (The ``tokenizers`` WordPiece trainer breaks ties between equally frequent
  pairs differently from run to run; the vocabulary must be a function of
  the documents alone, as the cache key says it is.)
  """
  t = _tokenizers()
  normalizer = t.normalizers.BertNormalizer(lowercase=tok_cfg.lowercase)
  pre_tokenizer = t.pre_tokenizers.BertPreTokenizer()
  counts = collections.Counter()
  for doc in docs:  # BertPreTokenizer's words, 4x faster (only the counts need them).
    counts.update(_BERT_WORD.findall(normalizer.normalize_str(doc)))
  vocab = learn_wordpiece(counts, tok_cfg.vocab_size, specials)
  tk = t.Tokenizer(t.models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token='[UNK]'))
  tk.normalizer, tk.pre_tokenizer = normalizer, pre_tokenizer
  tk.decoder = t.decoders.WordPiece()
  tk.add_special_tokens(specials)
  return tk


# Runs of letters and digits, or one punctuation mark (BERT counts _ as one).
_BERT_WORD = re.compile(r'[^\W_]+|[^\w\s]|_')


def learn_wordpiece(counts: dict[str, int], vocab_size: int, specials: Sequence[str],
                    prefix: str = '##') -> list[str]:
  """A WordPiece vocabulary by BPE-style merges, deterministic (ties: the smaller pair).

  Words start as their characters (``'##'`` before all but the first); the
  most frequent adjacent pair merges until the vocabulary is full. At most
  half of it goes to single characters, the most frequent first.
  """
  words = [[w[0]] + [prefix + c for c in w[1:]] for w in sorted(counts)]
  freq = [counts[w] for w in sorted(counts)]
  symbol_counts = collections.Counter()
  for syms, n in zip(words, freq):
    symbol_counts.update({s: n for s in syms})
  room = max(vocab_size - len(specials), 0)
  alphabet = sorted(symbol_counts, key=lambda s: (-symbol_counts[s], s))[:max(room // 2, 1)]
  vocab, known = [*specials, *sorted(alphabet)], set(alphabet)
  keep = [i for i, syms in enumerate(words) if set(syms) <= known]
  words, freq = [words[i] for i in keep], [freq[i] for i in keep]
  pairs, where = collections.Counter(), collections.defaultdict(set)
  for i, syms in enumerate(words):
    for pair in zip(syms, syms[1:]):
      pairs[pair] += freq[i]
      where[pair].add(i)
  heap = [(-n, pair) for pair, n in pairs.items()]
  heapq.heapify(heap)
  while len(vocab) < vocab_size and heap:
    n, pair = heapq.heappop(heap)
    if -n != pairs.get(pair, 0) or n == 0:
      continue  # Stale: the count changed since this entry was pushed.
    merged = pair[0] + pair[1][len(prefix):]
    vocab.append(merged)
    touched = set()
    for i in sorted(where.pop(pair)):
      touched |= _merge_in_word(words, freq, i, pair, merged, pairs, where)
    del pairs[pair]
    for p in sorted(touched - {pair}):
      if pairs.get(p, 0) > 0:
        heapq.heappush(heap, (-pairs[p], p))
  return vocab


def _merge_in_word(words, freq, i, pair, merged, pairs, where) -> set:
  """Replaces ``pair`` by ``merged`` in word ``i``; returns the pairs whose count changed."""
  syms, n = words[i], freq[i]
  for old in zip(syms, syms[1:]):
    pairs[old] -= n
  out, j = [], 0
  while j < len(syms):
    if j + 1 < len(syms) and (syms[j], syms[j + 1]) == pair:
      out.append(merged)
      j += 2
    else:
      out.append(syms[j])
      j += 1
  words[i] = out
  for new in zip(out, out[1:]):
    pairs[new] += n
    where[new].add(i)
  return set(zip(syms, syms[1:])) | set(zip(out, out[1:]))


def train(docs: list[str], prefix: str, tok_cfg, *, encoder: bool) -> str:
  """Trains ``tok_cfg.kind`` ('bytelevel_bpe' or 'wordpiece') on ``docs``.

  Writes ``<dir of prefix>/tokenizer.json`` and ``tokenizer_config.json``
  (the json last, so its presence means both are whole) and returns the
  tokenizer.json path. An encoder's vocabulary also gets a mask token
  (``<mask>``, which absorbs the space before it as RoBERTa's does, or
  ``[MASK]``).
  """
  t = _tokenizers()
  kind = tok_cfg.kind
  if kind == 'bytelevel_bpe':
    tk = t.Tokenizer(t.models.BPE())
    tk.pre_tokenizer = t.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = t.decoders.ByteLevel()
    specials = [t.AddedToken(s, special=True) for s in BYTELEVEL_SPECIALS]
    if encoder:
      specials.append(t.AddedToken('<mask>', lstrip=True, special=True))
    trainer = t.trainers.BpeTrainer(
        vocab_size=tok_cfg.vocab_size, min_frequency=2, special_tokens=specials,
        initial_alphabet=t.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    roles = dict(bos='<s>', eos='</s>', unk='<unk>', pad='<pad>', cls='<s>', sep='</s>',
                 mask='<mask>' if encoder else None)
  elif kind == 'wordpiece':
    specials = [*WORDPIECE_SPECIALS, *(['[MASK]'] if encoder else [])]
    tk = _train_wordpiece(docs, tok_cfg, specials)
    roles = dict(bos='[CLS]', eos='[SEP]', unk='[UNK]', pad='[PAD]', cls='[CLS]',
                 sep='[SEP]', mask='[MASK]' if encoder else None)
  else:
    raise ValueError(kind)
  if kind == 'bytelevel_bpe':
    tk.train_from_iterator(docs, trainer=trainer, length=len(docs))
  cls_id, sep_id = tk.token_to_id(roles['cls']), tk.token_to_id(roles['sep'])
  if kind == 'bytelevel_bpe':
    tk.post_processor = t.processors.RobertaProcessing(
        ('</s>', sep_id), ('<s>', cls_id), add_prefix_space=False)
  else:
    tk.post_processor = t.processors.BertProcessing(('[SEP]', sep_id), ('[CLS]', cls_id))
  directory = os.path.dirname(os.path.abspath(prefix))
  os.makedirs(directory, exist_ok=True)
  files.atomic_write(os.path.join(directory, CONFIG_JSON), _canonical_config(roles))
  path = os.path.join(directory, TOKENIZER_JSON)
  files.atomic_write(path, tk.to_str().encode())
  return path
