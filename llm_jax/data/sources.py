"""Where documents come from: the embedded default, text/JSONL globs, TFDS.

``iter_documents(config.data)`` yields raw document texts in a deterministic
order. Everything the user can get wrong (an unknown source, a glob that
matches nothing, a JSONL field that is not there) is a ``UserError`` with one
clear line; binary files and invalid UTF-8 are survivable and only warned
about, with counts kept in a ``SourceStats`` for the data manifest.
"""

import dataclasses
import glob
import gzip
import itertools
import json
import logging
import os
import sysconfig
from collections.abc import Callable, Iterator

from llm_jax.core.errors import UserError

SOURCES = ('default', 'text', 'jsonl', 'tfds')

# A NUL byte this early means a binary file: text files practically never hold
# one, and this is the same test git and grep use.
_BINARY_SNIFF_BYTES = 8192
# A few malformed JSONL lines are tolerated (skipped and counted); more than
# this means the file or data.jsonl_field is wrong, and we stop.
MAX_BAD_JSONL_LINES = 10
_NAMED_WARNINGS = 5  # Per kind of problem, warn by name this many times.

Log = Callable[[str], None]


@dataclasses.dataclass
class SourceStats:
  """Counters of what reading the source met, for logs and the manifest."""
  documents: int = 0
  files_read: int = 0
  bytes_read: int = 0
  binary_skipped: int = 0
  invalid_utf8_bytes: int = 0  # Bytes that were not UTF-8, now U+FFFD.
  docs_with_invalid_utf8: int = 0
  bad_jsonl_lines: int = 0
  # The first few documents with invalid UTF-8 (paths: not for manifests).
  invalid_utf8_examples: list[str] = dataclasses.field(default_factory=list)

  def counts(self) -> dict[str, int]:
    """The counters alone (no paths), for the manifest."""
    return {k: v for k, v in dataclasses.asdict(self).items()
            if isinstance(v, int)}

  def summary(self) -> str:
    """One line for the log."""
    parts = [f'{self.documents} documents']
    if self.files_read:
      parts.append(f'{self.files_read} files')
    parts.append(f'{self.bytes_read / 1e6:.1f} MB')
    if self.binary_skipped:
      parts.append(f'{self.binary_skipped} binary files skipped')
    if self.invalid_utf8_bytes:
      parts.append(f'{self.invalid_utf8_bytes} invalid UTF-8 bytes replaced '
                   f'in {self.docs_with_invalid_utf8} documents')
    if self.bad_jsonl_lines:
      parts.append(f'{self.bad_jsonl_lines} malformed JSONL lines skipped')
    return ', '.join(parts)


def iter_documents(data_cfg, log: Log = logging.info,
                   stats: SourceStats | None = None) -> Iterator[str]:
  """Returns an iterator over the raw text of every document, in order.

  The config is checked (and file globs expanded) now, so a mistake raises
  here rather than at the first ``next()``.

  Args:
    data_cfg: ``config.data`` (source, paths, jsonl_field, tfds_*,
      max_documents).
    log: Where progress lines go; warnings go there too, prefixed, unless it
      is ``logging.info``, in which case they go to ``logging.warning``.
    stats: Optional counters, updated as documents are read.

  Returns:
    An iterator of document texts (str), at most ``data_cfg.max_documents``
    of them when that is > 0.

  Raises:
    UserError: the source is misconfigured.
  """
  stats = stats if stats is not None else SourceStats()
  docs = _open_source(data_cfg, log, stats)
  if data_cfg.max_documents > 0:
    docs = itertools.islice(docs, data_cfg.max_documents)
  return _counted(docs, log, stats)


def _counted(docs: Iterator[str], log: Log,
             stats: SourceStats) -> Iterator[str]:
  """Counts the documents and, at the end, warns with the totals."""
  for doc in docs:
    stats.documents += 1
    yield doc
  if stats.binary_skipped > _NAMED_WARNINGS:
    _warn(log, f'skipped {stats.binary_skipped} binary files in all')
  if stats.invalid_utf8_bytes:
    names = ', '.join(stats.invalid_utf8_examples)
    more = stats.docs_with_invalid_utf8 - len(stats.invalid_utf8_examples)
    _warn(log, f'{stats.invalid_utf8_bytes} bytes that were not valid UTF-8 '
               f'were replaced with U+FFFD in {stats.docs_with_invalid_utf8} '
               f'document(s): {names}' + (f' and {more} more' if more else ''))
  if stats.bad_jsonl_lines:
    _warn(log, f'skipped {stats.bad_jsonl_lines} malformed JSONL line(s)')


def _open_source(data_cfg, log: Log, stats: SourceStats) -> Iterator[str]:
  """Checks the chosen source's config; returns its document iterator."""
  source = data_cfg.source
  if source == 'default':
    return _read_files(stdlib_python_files(), log, stats)
  if source == 'text':
    return _read_files(expand_globs(data_cfg.paths, source), log, stats)
  if source == 'jsonl':
    files = expand_globs(data_cfg.paths, source)
    return _read_jsonl(files, data_cfg.jsonl_field, log, stats)
  if source == 'tfds':
    if not data_cfg.tfds_name:
      raise UserError("data.source='tfds' needs a dataset name: set "
                      '--config.data.tfds_name=NAME (e.g. lm1b)')
    return _read_tfds(data_cfg, stats)
  raise UserError(f'unknown data.source={source!r}; valid sources: '
                  f'{", ".join(SOURCES)}')


def stdlib_python_files() -> list[str]:
  """The standard library's own .py files (not site-/dist-packages), sorted."""
  root = sysconfig.get_paths()['stdlib']
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Prune installed packages: they differ per machine and are not the
    # stdlib, and walking them would dominate the time on big installs.
    dirnames[:] = [d for d in dirnames
                   if d not in ('site-packages', 'dist-packages')]
    files.extend(os.path.join(dirpath, f) for f in filenames
                 if f.endswith('.py'))
  if not files:
    raise UserError(f'no standard-library .py files found under {root}; '
                    "set --config.data.source to 'text', 'jsonl' or 'tfds'")
  return sorted(files)


def expand_globs(paths: str, source: str) -> list[str]:
  """Expands comma-separated globs (``**`` recursive, ``~``) to sorted files.

  Raises:
    UserError: no globs are given, or one matches no files.
  """
  patterns = [p.strip() for p in paths.split(',') if p.strip()]
  if not patterns:
    raise UserError(f'data.source={source!r} reads files but data.paths is '
                    'empty: set --config.data.paths=GLOB[,GLOB...] '
                    "(e.g. 'data/**/*.txt')")
  files = set()
  for pattern in patterns:
    matched = [f for f in glob.glob(os.path.expanduser(pattern),
                                    recursive=True) if os.path.isfile(f)]
    if not matched:
      raise UserError(f'data.paths glob {pattern!r} matches no files '
                      f'(relative to the working directory {os.getcwd()})')
    files.update(matched)
  return sorted(files)


def _read_files(files: list[str], log: Log,
                stats: SourceStats) -> Iterator[str]:
  """Yields each file's text; skips binary files with a warning."""
  for path in files:
    with open(path, 'rb') as f:
      data = f.read()
    if b'\0' in data[:_BINARY_SNIFF_BYTES]:
      stats.binary_skipped += 1
      if stats.binary_skipped <= _NAMED_WARNINGS:
        _warn(log, f'skipping binary file {path} (NUL byte in its first '
                   f'{_BINARY_SNIFF_BYTES} bytes)')
      continue
    stats.files_read += 1
    stats.bytes_read += len(data)
    text, invalid = decode_utf8(data)
    _count_invalid(stats, invalid, path)
    yield text


def decode_utf8(data: bytes) -> tuple[str, int]:
  """Decodes UTF-8, replacing invalid bytes instead of failing.

  Returns:
    The text, with U+FFFD where the bytes were not UTF-8, and how many bytes
    were invalid.
  """
  try:
    return data.decode('utf-8'), 0
  except UnicodeDecodeError:
    pass
  # surrogateescape maps each undecodable byte to one lone surrogate, which
  # gives an exact count; 'replace' then gives the text users expect.
  escaped = data.decode('utf-8', 'surrogateescape')
  invalid = sum(1 for c in escaped if '\udc80' <= c <= '\udcff')
  return data.decode('utf-8', 'replace'), invalid


def _count_invalid(stats: SourceStats, invalid: int, where: str) -> None:
  """Counts a document's invalid bytes; notes the first few documents."""
  if invalid:
    stats.invalid_utf8_bytes += invalid
    stats.docs_with_invalid_utf8 += 1
    if len(stats.invalid_utf8_examples) < _NAMED_WARNINGS:
      stats.invalid_utf8_examples.append(where)


def _read_jsonl(files: list[str], field: str, log: Log,
                stats: SourceStats) -> Iterator[str]:
  """Yields ``obj[field]`` of every non-blank line of the JSONL files."""
  for path in files:
    opener = gzip.open if path.endswith('.gz') else open
    stats.files_read += 1
    with opener(path, 'rb') as f:
      for line_no, raw in enumerate(f, start=1):
        stats.bytes_read += len(raw)
        if not raw.strip():
          continue
        line, invalid = decode_utf8(raw)
        _count_invalid(stats, invalid, f'{path}:{line_no}')
        text = _jsonl_text(line, field, f'{path}:{line_no}', log, stats)
        if text is not None:
          yield text


def _jsonl_text(line: str, field: str, where: str, log: Log,
                stats: SourceStats) -> str | None:
  """The text of one JSONL line, or None (warned, counted) when malformed."""
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    problem = f'is not valid JSON ({e.msg})'
  else:
    if not isinstance(obj, dict):
      problem = f'is a JSON {type(obj).__name__}, not an object'
    elif field not in obj:
      keys = ', '.join(repr(k) for k in list(obj)[:8])
      problem = (f'has no field {field!r} (it has {keys}); set '
                 '--config.data.jsonl_field to the field that holds the text')
    elif not isinstance(obj[field], str):
      problem = (f'has field {field!r} of type {type(obj[field]).__name__}, '
                 'not a string')
    else:
      return obj[field]
  stats.bad_jsonl_lines += 1
  if stats.bad_jsonl_lines > MAX_BAD_JSONL_LINES:
    raise UserError(f'{where} {problem}; stopping after more than '
                    f'{MAX_BAD_JSONL_LINES} malformed JSONL lines')
  _warn(log, f'skipping {where}: it {problem}')
  return None


def _read_tfds(data_cfg, stats: SourceStats) -> Iterator[str]:
  """Loads a TFDS split; returns an iterator over its ``tfds_field`` texts."""
  # TF must come in through tfhost (accelerators hidden) before TFDS.
  from llm_jax.core.tfhost import tf  # noqa: F401  (hides accelerators before TFDS imports TF)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name, split, field = (data_cfg.tfds_name, data_cfg.tfds_split,
                        data_cfg.tfds_field)
  try:
    ds = tfds.load(name, split=split, shuffle_files=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f'data.tfds_name={name!r} is not a TensorFlow Datasets '
                    'name; see https://www.tensorflow.org/datasets/catalog'
                    ) from None
  except ValueError as e:  # E.g. an unknown split; TFDS says which exist.
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ''
    raise UserError(f'cannot load TFDS {name!r} split '
                    f'data.tfds_split={split!r}: {first_line}') from None
  spec = ds.element_spec
  if not isinstance(spec, dict) or field not in spec:
    features = (', '.join(sorted(spec)) if isinstance(spec, dict)
                else 'no named features')
    raise UserError(f'TFDS {name}:{split} has no feature '
                    f'data.tfds_field={field!r} (it has {features})')
  return _tfds_texts(tfds.as_numpy(ds), f'{name}:{split}', field, stats)


def _tfds_texts(examples, where: str, field: str,
                stats: SourceStats) -> Iterator[str]:
  for k, example in enumerate(examples):
    value = example[field]
    if isinstance(value, bytes):
      stats.bytes_read += len(value)
      value, invalid = decode_utf8(value)
      _count_invalid(stats, invalid, f'{where} example {k}')
    yield str(value)


def _warn(log: Log, message: str) -> None:
  """Sends a warning to ``log``, or to logging.warning for the default log."""
  if log is logging.info:
    logging.warning(message)
  else:
    log(f'Warning: {message}')
