"""Tests of llm_jax/data/sources.py and clean.py: reading, errors, cleaning."""

import gzip
import json
import logging
import os

import pytest

from llm_jax.core import configuration
from llm_jax.data import clean
from llm_jax.data import sources
from llm_jax.core.errors import UserError



def _data_config(**overrides):
  """A fresh ``config.data`` from configs/base.py with ``overrides``."""
  data = configuration.base_config().data
  data.update(overrides)
  return data


def _read(data_cfg, **kw):
  return list(sources.iter_documents(data_cfg, **kw))


# ---- 'text' source.


def test_text_glob_reads_files_sorted(tmp_path):
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'b.txt').write_text('bee')
  (tmp_path / 'a.txt').write_text('ay')
  (tmp_path / 'sub' / 'c.txt').write_text('sea')
  (tmp_path / 'skip.md').write_text('not matched')
  stats = sources.SourceStats()
  docs = _read(_data_config(source='text', paths=f'{tmp_path}/**/*.txt'),
               stats=stats)
  assert docs == ['ay', 'bee', 'sea']
  assert (stats.documents, stats.files_read) == (3, 3)


def test_several_globs_and_max_documents(tmp_path):
  for name in ['x1.txt', 'x2.txt', 'y.log']:
    (tmp_path / name).write_text(name)
  cfg = _data_config(source='text', paths=f'{tmp_path}/*.log, {tmp_path}/x*')
  assert _read(cfg) == ['x1.txt', 'x2.txt', 'y.log']
  cfg.max_documents = 2
  assert _read(cfg) == ['x1.txt', 'x2.txt']


def test_home_is_expanded(tmp_path, monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path))
  (tmp_path / 'notes').mkdir()
  (tmp_path / 'notes' / 'n.txt').write_text('from home')
  assert _read(_data_config(source='text', paths='~/notes/*.txt')) == [
      'from home']


def test_glob_without_matches_names_it(tmp_path):
  glob = f'{tmp_path}/nothing/*.txt'
  with pytest.raises(UserError) as e:
    sources.iter_documents(_data_config(source='text', paths=glob))
  assert glob in str(e.value) and 'matches no files' in str(e.value)
  assert os.getcwd() in str(e.value)


@pytest.mark.parametrize('source', ['text', 'jsonl'])
def test_empty_paths_is_a_user_error(source):
  with pytest.raises(UserError, match=r'--config.data.paths='):
    sources.iter_documents(_data_config(source=source, paths=' '))


def test_binary_file_is_skipped_with_a_warning(tmp_path):
  (tmp_path / 'good.txt').write_text('hello')
  (tmp_path / 'blob.txt').write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00\x00')
  lines, stats = [], sources.SourceStats()
  docs = _read(_data_config(source='text', paths=str(tmp_path / '*.txt')),
               log=lines.append, stats=stats)
  assert docs == ['hello']
  assert stats.binary_skipped == 1
  assert any('blob.txt' in l and l.startswith('Warning') for l in lines)


def test_binary_warning_goes_to_logging_by_default(tmp_path, caplog):
  (tmp_path / 'blob.bin').write_bytes(b'\x00' * 10)
  (tmp_path / 'ok.bin').write_bytes(b'fine')
  with caplog.at_level(logging.WARNING):
    docs = _read(_data_config(source='text', paths=str(tmp_path / '*')))
  assert docs == ['fine']
  assert 'blob.bin' in caplog.text


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
  (tmp_path / 'bad.txt').write_bytes(b'caf\xe9 ok \xff\xfe end')
  (tmp_path / 'good.txt').write_bytes('café'.encode())
  lines, stats = [], sources.SourceStats()
  docs = _read(_data_config(source='text', paths=str(tmp_path / '*.txt')),
               log=lines.append, stats=stats)
  assert docs == ['caf\ufffd ok \ufffd\ufffd end', 'café']
  assert stats.invalid_utf8_bytes == 3
  assert stats.docs_with_invalid_utf8 == 1
  assert any('bad.txt' in l and '3 bytes' in l for l in lines)
  assert not any('good.txt' in l for l in lines)


# ---- 'jsonl' source.


def _jsonl(path, records, opener=open):
  with opener(path, 'wt') as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + '\n')


def test_jsonl_field_blank_lines_and_gzip(tmp_path):
  _jsonl(tmp_path / 'a.jsonl', [{'body': 'one', 'id': 1}, '', '  ',
                                {'body': 'two'}])
  _jsonl(tmp_path / 'b.jsonl.gz', [{'body': 'три'}], opener=gzip.open)
  cfg = _data_config(source='jsonl', paths=str(tmp_path / '*.jsonl*'),
                     jsonl_field='body')
  assert _read(cfg) == ['one', 'two', 'три']


def test_jsonl_bad_lines_are_skipped_and_counted(tmp_path):
  _jsonl(tmp_path / 'a.jsonl', [{'text': 'ok'}, '{not json', [1, 2],
                                {'other': 'x'}, {'text': 'fine'}])
  lines, stats = [], sources.SourceStats()
  cfg = _data_config(source='jsonl', paths=str(tmp_path / 'a.jsonl'))
  assert _read(cfg, log=lines.append, stats=stats) == ['ok', 'fine']
  assert stats.bad_jsonl_lines == 3
  assert any('a.jsonl:2' in l for l in lines)
  assert any("a.jsonl:4" in l and "'text'" in l for l in lines)


def test_jsonl_wrong_field_everywhere_is_a_user_error(tmp_path):
  _jsonl(tmp_path / 'a.jsonl', [{'content': f'doc {i}'} for i in range(20)])
  cfg = _data_config(source='jsonl', paths=str(tmp_path / 'a.jsonl'))
  with pytest.raises(UserError) as e:
    _read(cfg, log=lambda _: None)
  message = str(e.value)
  assert 'a.jsonl:11' in message and "no field 'text'" in message
  assert "'content'" in message and 'jsonl_field' in message


# ---- 'tfds', 'default' and bad sources.


def test_tfds_mock_lm1b_yields_texts():
  from llm_jax.core.tfhost import tf  # noqa: F401  (hides accelerators from TF first)
  import tensorflow_datasets as tfds
  cfg = _data_config(source='tfds', tfds_name='lm1b', max_documents=4)
  with tfds.testing.mock_data(num_examples=6,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    docs = _read(cfg)
    assert len(docs) == 4
    assert all(isinstance(d, str) and d for d in docs)
    cfg.tfds_field = 'nope'
    with pytest.raises(UserError, match="tfds_field='nope'.*text"):
      sources.iter_documents(cfg)


def test_tfds_without_name_is_a_user_error():
  with pytest.raises(UserError, match='tfds_name'):
    sources.iter_documents(_data_config(source='tfds'))


def test_unknown_source_lists_the_valid_ones():
  with pytest.raises(UserError, match="'hdfs'.*default, text, jsonl, tfds"):
    sources.iter_documents(_data_config(source='hdfs'))


def test_default_source_is_the_stdlib():
  files = sources.stdlib_python_files()
  assert files == sorted(files) and len(files) > 500
  assert any(f.endswith(os.sep + 'os.py') for f in files)
  assert not any('site-packages' in f or 'dist-packages' in f for f in files)
  docs = _read(_data_config(max_documents=3))
  assert len(docs) == 3 and all(isinstance(d, str) for d in docs)


# ---- clean.py.


def test_cleaning_normalises_and_counts():
  docs = [
      'Cafe\u0301 au lait, composed to NFC.',  # e + combining acute.
      'Caf\u00e9 au lait, composed to NFC.',  # Same text, precomposed.
      'line one\r\nline two\rline three\x00\x1b[0m\x7f\t tab kept',
      'short',
      'line one\nline two\nline three[0m\t tab kept',  # Dup after cleaning.
      'zero\u200dwidth joiner is a format char and stays',
  ]
  kept, stats = clean.clean_documents(iter(docs), min_chars=10)
  assert kept == ['Caf\u00e9 au lait, composed to NFC.',
                  'line one\nline two\nline three[0m\t tab kept',
                  'zero\u200dwidth joiner is a format char and stays']
  assert (stats.input, stats.kept, stats.duplicates, stats.too_short,
          stats.control_chars_removed) == (6, 3, 2, 1, 3)
  summary = stats.summary()
  assert '3 of 6' in summary and '2 exact duplicates' in summary
  assert '1 shorter than 10' in summary


def test_empty_documents_are_always_dropped():
  kept, stats = clean.clean_documents(['', '\x00', 'a'], min_chars=0)
  assert kept == ['a'] and stats.too_short == 2


def test_split_by_hash_is_deterministic_and_disjoint():
  docs = [f'document number {i}' for i in range(400)]
  train, val = clean.split_by_hash(docs, 0.1)
  assert (train, val) == clean.split_by_hash(docs, 0.1)
  assert not set(train) & set(val) and len(train) + len(val) == 400
  assert 15 < len(val) < 70
  # Membership follows the content, not the position.
  train2, val2 = clean.split_by_hash(list(reversed(docs)), 0.1)
  assert set(val2) == set(val) and set(train2) == set(train)


def test_split_by_hash_guarantees_both_splits():
  docs = ['alpha', 'beta', 'gamma']
  train, val = clean.split_by_hash(docs, 1e-9)
  assert len(val) == 1 and len(train) == 2
  train, val = clean.split_by_hash(docs, 0.999999)
  assert len(train) >= 1 and len(val) >= 1
  assert clean.split_by_hash(['only'], 0.5) == (['only'], [])
  assert clean.split_by_hash(docs, 0.0) == (docs, [])
  with pytest.raises(UserError, match='val_fraction'):
    clean.split_by_hash(docs, 1.0)
