"""Preparing data: documents -> cleaned -> tokenizer -> flat token shards.

``prepare(config)`` is the one entry point. Its outputs live in a cache keyed
by content, shared by runs::

  <cache>/tokenizers/<key>/tokenizer.model   key: train docs + settings
                         (or tokenizer.json + tokenizer_config.json: tokenizer.kind)
  <cache>/shards/<key>/manifest.json         key: all docs + tokenizer + split
  <cache>/shards/<key>/tokenizer.model       (a copy of the tokenizer's files:
                                             the dir is self-contained)
  <cache>/shards/<key>/train-00000-of-00001.bin
  <cache>/shards/<key>/val-00000-of-00001.bin
  <cache>/locks/shards-<key>.lock            held while that entry is built

A shard is the raw little-endian token ids of whole documents, each followed
by ``eos_id``. A shard directory is built under a temporary name and renamed
into place only when complete, so a directory with the final name always
holds a whole, valid build; one without a valid manifest is rebuilt. The
manifest holds nothing machine-specific (no paths, no times), so its hash
identifies the data.
"""

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import sentencepiece as spm
import tokenizers

from llm_jax.core import files
from llm_jax.data import clean
from llm_jax.data import sources
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.core.errors import UserError

FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
MAX_SHARD_TOKENS = 64 * 2**20  # Tokens per shard file (128 MiB as uint16).
LOCKS_DIR = 'locks'  # <cache>/locks/: one lock file per entry being built.
# Documents are encoded in groups of about this many characters: big enough
# for the encoder's threads, small enough that the Python int lists stay small.
_ENCODE_CHUNK_CHARS = 4_000_000

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """Token shards ready for ``pipeline.TokenWindows``, and their tokenizer."""
  dir: str
  tokenizer: tokenizer_lib.Tokenizer  # or an hf_tokenizer.HFTokenizer
  train_shards: tuple[str, ...]
  val_shards: tuple[str, ...]
  manifest: dict
  # The model's rows when it starts from weights (init_from) whose vocabulary
  # is padded past the tokenizer's (Qwen2's is); 0: the tokenizer's.
  vocab_floor: int = 0

  @property
  def vocab_size(self) -> int:
    return max(self.tokenizer.vocab_size, self.vocab_floor)

  @property
  def dtype(self) -> np.dtype:
    """The dtype of the token ids in the shard files."""
    return np.dtype(self.manifest['dtype'])

  @property
  def unigram_entropy(self) -> float:
    """Entropy (nats/token) of the train split's token frequencies."""
    return self.manifest['unigram_entropy_nats']

  @property
  def train_tokens(self) -> int:
    return self.manifest['splits']['train']['tokens']

  @property
  def val_tokens(self) -> int:
    return self.manifest['splits']['val']['tokens']

  @property
  def manifest_path(self) -> str:
    return os.path.join(self.dir, MANIFEST)


def cache_root(data_cfg) -> str:
  """``data.cache_dir``, else ``$LLM_JAX_CACHE``, else ``~/.cache/llm_jax``."""
  root = (data_cfg.cache_dir or os.environ.get('LLM_JAX_CACHE')
          or '~/.cache/llm_jax')
  return os.path.abspath(os.path.expanduser(root))


def load_shard(path: str, dtype) -> np.ndarray:
  """Maps a shard file read-only (an empty file gives an empty array)."""
  if os.path.getsize(path) == 0:  # np.memmap cannot map an empty file.
    return np.zeros(0, dtype)
  return np.memmap(path, dtype=np.dtype(dtype).newbyteorder('<'), mode='r')


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id fits, else uint32."""
  return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def prepare(config, log: Log = logging.info) -> PreparedData:
  """Reads, cleans, splits and tokenizes the corpus, or finds it cached.

  Args:
    config: The full config (reads ``config.data`` and ``config.tokenizer``).
    log: Receives one line per stage.

  Returns:
    The prepared data.

  Raises:
    UserError: the source is misconfigured, or nothing is left to train on.
  """
  root = cache_root(config.data)
  docs, source_stats, clean_stats = _read_and_clean(config.data, log)
  train_docs, val_docs = clean.split_by_hash(docs, config.data.val_fraction)
  log(f'Split by content hash: {len(train_docs)} train and {len(val_docs)} '
      f'validation documents (data.val_fraction={config.data.val_fraction})')
  tokenizer = get_tokenizer(config, train_docs, root, log)
  key_fields = dict(format_version=FORMAT_VERSION,
                    content_sha256=content_hash(docs),
                    tokenizer_sha256=tokenizer.sha256,
                    val_fraction=config.data.val_fraction)
  key = _sha256_json(key_fields)
  out_dir = os.path.join(root, 'shards', key[:16])
  # One process builds a cache entry at a time; another preparing the same
  # data waits, then finds it whole (a valid entry is never replaced).
  with files.FileLock(os.path.join(root, LOCKS_DIR, f'shards-{key[:16]}.lock')):
    cached = _load_cached(out_dir, key)
    if cached is not None:
      log(f'Using cached token shards at {out_dir} ({cached.train_tokens:,} '
          f'train, {cached.val_tokens:,} validation tokens)')
      return cached
    manifest = dict(key_fields, cache_key=key,
                    source=dict(source_stats.counts(), name=config.data.source),
                    cleaning=dataclasses.asdict(clean_stats),
                    tokenizer=_tokenizer_info(config, tokenizer))
    _build(out_dir, manifest, tokenizer, {'train': train_docs, 'val': val_docs},
           config.data.num_threads, log)
    prepared = _load_cached(out_dir, key)
  assert prepared is not None, f'{out_dir} was just built but is not valid'
  return prepared


def _read_and_clean(data_cfg, log: Log):
  """Reads and cleans every document; fails if none is left."""
  start = time.perf_counter()
  stats = sources.SourceStats()
  docs = sources.iter_documents(data_cfg, log, stats)
  kept, clean_stats = clean.clean_documents(docs, data_cfg.min_doc_chars)
  log(f'Read data.source={data_cfg.source!r} in '
      f'{time.perf_counter() - start:.1f}s: {stats.summary()}')
  log(clean_stats.summary())
  if not kept:
    raise UserError(
        f'no documents left after cleaning: {clean_stats.input} read, '
        f'{clean_stats.too_short} too short (< data.min_doc_chars='
        f'{data_cfg.min_doc_chars}), {clean_stats.duplicates} duplicates; '
        'point data.source/data.paths at more text or lower '
        '--config.data.min_doc_chars')
  return kept, stats, clean_stats


def content_hash(docs: list[str]) -> str:
  """sha256 of the documents in order (length-prefixed, so unambiguous)."""
  h = hashlib.sha256()
  for doc in docs:
    data = doc.encode('utf-8')
    h.update(b'%d:' % len(data))
    h.update(data)
  return h.hexdigest()


def _sha256_json(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _tokenizer_settings(tok_cfg, extra_symbols: tuple[str, ...] = ()) -> dict:
  """Everything that decides what training produces, for the cache key."""
  if tok_cfg.kind != 'sentencepiece':
    return dict(kind=tok_cfg.kind, vocab_size=tok_cfg.vocab_size,
                lowercase=tok_cfg.lowercase if tok_cfg.kind == 'wordpiece' else None,
                encoder=bool(extra_symbols), tokenizers_version=tokenizers.__version__)
  # SentencePiece keys are what they were before tokenizer.kind existed.
  settings = dict(vocab_size=tok_cfg.vocab_size, model_type=tok_cfg.model_type,
                  character_coverage=tok_cfg.character_coverage,
                  input_sentence_size=tok_cfg.input_sentence_size,
                  trainer_options=tokenizer_lib.TRAINER_OPTIONS,
                  sentencepiece_version=spm.__version__)
  if extra_symbols:  # Only when present, so decoder cache keys stay as they were.
    settings['extra_symbols'] = list(extra_symbols)
  return settings


def _extra_symbols(config) -> tuple[str, ...]:
  """Pieces the model kind needs: ``<mask>`` for an encoder."""
  return (tokenizer_lib.MASK_PIECE,) if config.model.kind == 'encoder' else ()


def get_tokenizer(config, train_docs: list[str], root: str, log: Log):
  """Loads ``tokenizer.path``, a cached tokenizer, or trains and caches one.

  The kind trained is ``tokenizer.kind``; a path may be a SentencePiece
  ``.model`` or a Hugging Face tokenizer (``tokenizer_lib.load``).
  """
  if config.tokenizer.path:
    tok = tokenizer_lib.load(os.path.expanduser(config.tokenizer.path))
    log(f'Using tokenizer {tok.path} ({tok.vocab_size} pieces)')
    return tok
  key = _sha256_json(dict(train_content_sha256=content_hash(train_docs),
                          **_tokenizer_settings(config.tokenizer,
                                                _extra_symbols(config))))
  prefix = os.path.join(root, 'tokenizers', key[:16], 'tokenizer')
  cached = os.path.join(os.path.dirname(prefix),
                        tokenizer_lib.file_name(config.tokenizer.kind))
  with files.FileLock(os.path.join(root, LOCKS_DIR, f'tokenizer-{key[:16]}.lock')):
    if os.path.exists(cached):
      try:
        tok = tokenizer_lib.load(cached)
        log(f'Using cached tokenizer at {tok.path} ({tok.vocab_size} pieces)')
        return tok
      except UserError as e:
        log(f'Warning: retraining the tokenizer: {e}')
    start = time.perf_counter()
    path = tokenizer_lib.train(train_docs, prefix, config.tokenizer, config.data.num_threads,
                               encoder=bool(_extra_symbols(config)))
  tok = tokenizer_lib.load(path)
  what = (config.tokenizer.model_type if config.tokenizer.kind == 'sentencepiece'
          else config.tokenizer.kind)
  log(f'Trained a {what} tokenizer with {tok.vocab_size} pieces on '
      f'{len(train_docs)} documents in {time.perf_counter() - start:.1f}s: {path}')
  return tok


def _tokenizer_info(config, tok) -> dict:
  """The manifest's record of the tokenizer (no paths: they vary)."""
  info = dict(file=tok.file_name, sha256=tok.sha256,
              vocab_size=tok.vocab_size, pad_id=tok.pad_id,
              unk_id=tok.unk_id, bos_id=tok.bos_id, eos_id=tok.eos_id,
              trained=not config.tokenizer.path)
  if not config.tokenizer.path:
    info['settings'] = _tokenizer_settings(config.tokenizer, _extra_symbols(config))
  return info


def _load_cached(out_dir: str, key: str) -> PreparedData | None:
  """The prepared data in ``out_dir`` if it is a whole build of ``key``."""
  try:
    with open(os.path.join(out_dir, MANIFEST)) as f:
      manifest = json.load(f)
    if (manifest['format_version'] != FORMAT_VERSION
        or manifest['cache_key'] != key):
      return None
    itemsize = np.dtype(manifest['dtype']).itemsize
    shards = {}
    for split in ('train', 'val'):
      shards[split] = tuple(os.path.join(out_dir, s['file'])
                            for s in manifest['splits'][split]['shards'])
      for path, s in zip(shards[split], manifest['splits'][split]['shards']):
        if os.path.getsize(path) != s['tokens'] * itemsize:
          return None
    tok = tokenizer_lib.load(os.path.join(out_dir, manifest['tokenizer']['file']))
    if tok.sha256 != manifest['tokenizer_sha256']:
      return None
  except (OSError, ValueError, KeyError, TypeError, UserError):
    return None  # Missing, partial or from another version: rebuild.
  return PreparedData(dir=out_dir, tokenizer=tok, train_shards=shards['train'],
                      val_shards=shards['val'], manifest=manifest)


def _build(out_dir: str, manifest: dict, tok,
           splits: dict[str, list[str]], num_threads: int, log: Log) -> None:
  """Encodes the splits into a temporary dir, then renames it to ``out_dir``."""
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp_dir = tempfile.mkdtemp(prefix=f'.tmp-{os.path.basename(out_dir)}-',
                             dir=parent)
  try:
    start = time.perf_counter()
    dtype = token_dtype(tok.vocab_size)
    counts = np.zeros(tok.vocab_size, np.int64)
    manifest['splits'] = {
        name: _write_split(tmp_dir, name, docs, tok, dtype, num_threads,
                           counts if name == 'train' else None)
        for name, docs in splits.items()}
    manifest['dtype'] = dtype.name
    manifest['vocab_size'] = tok.vocab_size
    manifest['unigram_entropy_nats'] = unigram_entropy(counts)
    _log_encoded(manifest, time.perf_counter() - start, log)
    for name, data in tok.files().items():
      with open(os.path.join(tmp_dir, name), 'wb') as f:
        f.write(data)
    with open(os.path.join(tmp_dir, MANIFEST), 'w') as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
      f.write('\n')
    _install(tmp_dir, out_dir, manifest['cache_key'])
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)  # Gone already on success.
  log(f'Wrote token shards to {out_dir}')


def _install(tmp_dir: str, out_dir: str, key: str) -> None:
  """Renames the finished build into place, replacing an invalid old one.

  Called under the entry's lock. The invalid old directory is renamed away
  before it is removed, so the name never holds a half-deleted tree.
  """
  if os.path.exists(out_dir):
    if _load_cached(out_dir, key) is not None:
      return  # Another process finished the same build first; keep theirs.
    stale = f'{out_dir}.stale-{os.getpid()}-{time.monotonic_ns()}'
    os.rename(out_dir, stale)  # Stale or broken: from another version, say.
    shutil.rmtree(stale, ignore_errors=True)
  try:
    os.rename(tmp_dir, out_dir)
  except OSError:
    # Another process installed the same build between the check and here
    # (one without locks: an older llm_jax, or a filesystem without flock).
    if _load_cached(out_dir, key) is None:
      raise


def _log_encoded(manifest: dict, seconds: float, log: Log) -> None:
  parts = []
  for name in ('train', 'val'):
    s = manifest['splits'][name]
    parts.append(f'{name} {s["tokens"]:,} tokens '
                 f'({s["bytes_per_token"]:.2f} bytes/token)')
  log(f'Encoded in {seconds:.1f}s: {", ".join(parts)}; unigram entropy '
      f'{manifest["unigram_entropy_nats"]:.3f} nats/token')


def _doc_chunks(docs: list[str]) -> Iterator[list[str]]:
  """Groups of consecutive documents of about _ENCODE_CHUNK_CHARS chars."""
  chunk, chars = [], 0
  for doc in docs:
    chunk.append(doc)
    chars += len(doc)
    if chars >= _ENCODE_CHUNK_CHARS:
      yield chunk
      chunk, chars = [], 0
  if chunk:
    yield chunk


def _write_split(out_dir: str, name: str, docs: list[str],
                 tok, dtype: np.dtype,
                 num_threads: int, counts: np.ndarray | None) -> dict:
  """Encodes one split into shard files; returns its manifest entry."""
  writer = _ShardWriter(out_dir, name, dtype)
  text_bytes = 0
  for chunk in _doc_chunks(docs):
    text_bytes += sum(len(d.encode('utf-8')) for d in chunk)
    ids = tok.encode_batch(chunk, num_threads)
    total = sum(map(len, ids)) + len(ids)
    eos = [tok.eos_id]
    tokens = np.fromiter(itertools.chain.from_iterable(
        itertools.chain(d, eos) for d in ids), dtype=dtype, count=total)
    if counts is not None:
      counts += np.bincount(tokens, minlength=len(counts))
    writer.write(tokens)
  shards = writer.finish()
  num_tokens = sum(s['tokens'] for s in shards)
  return dict(documents=len(docs), tokens=num_tokens, text_bytes=text_bytes,
              bytes_per_token=text_bytes / max(num_tokens, 1), shards=shards)


def unigram_entropy(counts: np.ndarray) -> float:
  """Entropy in nats of the distribution given by ``counts``."""
  total = counts.sum()
  if total == 0:
    return 0.0
  p = counts[counts > 0] / total
  return float(-(p * np.log(p)).sum())


class _ShardWriter:
  """Appends tokens to numbered shard files of at most MAX_SHARD_TOKENS."""

  def __init__(self, out_dir: str, split: str, dtype: np.dtype):
    self._out_dir, self._split = out_dir, split
    self._dtype = dtype.newbyteorder('<')
    self._sizes = []  # Tokens in each shard written so far.
    self._file = None

  def _part(self, index: int) -> str:
    return os.path.join(self._out_dir, f'{self._split}-{index:05d}.part')

  def write(self, tokens: np.ndarray) -> None:
    tokens = tokens.astype(self._dtype, copy=False)
    while tokens.size:
      if self._file is None or self._sizes[-1] == MAX_SHARD_TOKENS:
        if self._file is not None:
          self._file.close()
        self._file = open(self._part(len(self._sizes)), 'wb')
        self._sizes.append(0)
      n = min(tokens.size, MAX_SHARD_TOKENS - self._sizes[-1])
      self._file.write(tokens[:n].tobytes())
      self._sizes[-1] += n
      tokens = tokens[n:]

  def finish(self) -> list[dict]:
    """Closes and names the shards ``<split>-00000-of-0000N.bin``."""
    if self._file is not None:
      self._file.close()
    n = len(self._sizes)
    shards = []
    for i, size in enumerate(self._sizes):
      name = f'{self._split}-{i:05d}-of-{n:05d}.bin'
      os.rename(self._part(i), os.path.join(self._out_dir, name))
      shards.append(dict(file=name, tokens=size))
    return shards
