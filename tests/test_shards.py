"""Tests of llm_jax/data/shards.py: prepare, manifest, cache, errors."""

import json
import os
import pathlib

import numpy as np
import pytest

from llm_jax.core import configuration
from llm_jax.data import clean
from llm_jax.data import pipeline
from llm_jax.data import shards
from llm_jax.core.errors import UserError



def _base_config():
  """A fresh config from configs/base.py."""
  return configuration.base_config()


def _write_corpus(root: pathlib.Path, num_docs: int = 30) -> list[str]:
  """Writes small mixed-text documents; returns their texts in file order."""
  root.mkdir(parents=True, exist_ok=True)
  texts = []
  for i in range(num_docs):
    text = (f'def func_{i}(x):\n    """Doc {i}."""\n\treturn x * {i}\n\n'
            f'# Notes {i}: the quick brown fox, 中文 {i}, 🙂 ' * (1 + i % 3))
    (root / f'doc{i:03d}.txt').write_text(text, encoding='utf-8')
    texts.append(text)
  (root / 'dup.txt').write_text(texts[0], encoding='utf-8')  # Dropped.
  (root / 'tiny.txt').write_text('hi', encoding='utf-8')  # Too short.
  return texts


@pytest.fixture
def config(tmp_path):
  c = _base_config()
  c.data.source = 'text'
  c.data.paths = str(tmp_path / 'corpus' / '*.txt')
  c.data.cache_dir = str(tmp_path / 'cache')
  c.data.min_doc_chars = 16
  c.data.val_fraction = 0.2
  c.tokenizer.vocab_size = 400
  return c


def _read_split(prepared, split):
  paths = getattr(prepared, f'{split}_shards')
  return np.concatenate([shards.load_shard(p, prepared.dtype) for p in paths])


def _decode_docs(prepared, tokens):
  """Splits at eos (every document ends with one) and decodes each part."""
  eos = prepared.tokenizer.eos_id
  assert tokens[-1] == eos
  ends = np.flatnonzero(tokens == eos)
  starts = np.concatenate([[0], ends[:-1] + 1])
  return [prepared.tokenizer.decode(tokens[s:e]) for s, e in zip(starts, ends)]


def test_prepare_writes_shards_matching_manifest(tmp_path, config):
  texts = _write_corpus(tmp_path / 'corpus')
  lines = []
  prepared = shards.prepare(config, log=lines.append)
  m = prepared.manifest
  assert m == json.loads(pathlib.Path(prepared.manifest_path).read_text())
  assert m['dtype'] == 'uint16' and prepared.dtype == np.uint16
  assert m['tokenizer_sha256'] == prepared.tokenizer.sha256
  assert prepared.vocab_size == m['vocab_size'] <= 400
  assert (m['cleaning']['input'], m['cleaning']['kept'],
          m['cleaning']['duplicates'], m['cleaning']['too_short']) == (
              32, 30, 1, 1)
  train_docs, val_docs = clean.split_by_hash(texts, 0.2)
  for split, docs in [('train', train_docs), ('val', val_docs)]:
    info = m['splits'][split]
    assert info['documents'] == len(docs) > 0
    assert info['text_bytes'] == sum(len(d.encode()) for d in docs)
    tokens = _read_split(prepared, split)
    assert tokens.size == info['tokens'] == sum(
        s['tokens'] for s in info['shards'])
    assert _decode_docs(prepared, tokens) == docs
  assert [os.path.basename(p) for p in prepared.train_shards] == [
      'train-00000-of-00001.bin']
  assert prepared.train_tokens == m['splits']['train']['tokens']
  assert 0 < prepared.unigram_entropy < np.log(prepared.vocab_size)
  assert any('Trained a bpe tokenizer' in l for l in lines)
  assert any('Wrote token shards' in l for l in lines)


def test_second_prepare_uses_the_cache(tmp_path, config):
  _write_corpus(tmp_path / 'corpus')
  first = shards.prepare(config, log=lambda _: None)
  tok_files = list((tmp_path / 'cache' / 'tokenizers').glob('*/*.model'))
  assert len(tok_files) == 1
  mtime = tok_files[0].stat().st_mtime_ns
  lines = []
  second = shards.prepare(config, log=lines.append)
  assert any(l.startswith('Using cached token shards at ') for l in lines)
  assert any(l.startswith('Using cached tokenizer at ') for l in lines)
  assert not any('Trained' in l or 'Encoded' in l for l in lines)
  assert tok_files[0].stat().st_mtime_ns == mtime
  assert second.manifest == first.manifest and second.dir == first.dir
  # Nothing but finished builds in the cache.
  assert os.listdir(tmp_path / 'cache' / 'shards') == [
      os.path.basename(first.dir)]


def test_cache_without_valid_manifest_is_rebuilt(tmp_path, config):
  _write_corpus(tmp_path / 'corpus')
  first = shards.prepare(config, log=lambda _: None)
  os.remove(first.manifest_path)  # As if a build had been cut short.
  lines = []
  second = shards.prepare(config, log=lines.append)
  assert any('Wrote token shards' in l for l in lines)
  assert second.manifest == first.manifest


def test_changed_corpus_gets_new_shards(tmp_path, config):
  _write_corpus(tmp_path / 'corpus')
  first = shards.prepare(config, log=lambda _: None)
  (tmp_path / 'corpus' / 'new.txt').write_text('A brand new document here.')
  second = shards.prepare(config, log=lambda _: None)
  assert second.dir != first.dir
  assert second.manifest['content_sha256'] != first.manifest['content_sha256']


def test_empty_corpus_after_cleaning_is_a_user_error(tmp_path, config):
  (tmp_path / 'corpus').mkdir()
  for i in range(3):
    (tmp_path / 'corpus' / f'{i}.txt').write_text('short')
  (tmp_path / 'corpus' / 'copy.txt').write_text('short')
  with pytest.raises(UserError) as e:
    shards.prepare(config, log=lambda _: None)
  message = str(e.value)
  assert message.startswith('no documents left after cleaning: 4 read, ')
  assert '4 too short (< data.min_doc_chars=16)' in message
  assert 'min_doc_chars' in message.split(';')[-1]


def test_many_shards_and_windows_across_them(tmp_path, config, monkeypatch):
  _write_corpus(tmp_path / 'corpus')
  monkeypatch.setattr(shards, 'MAX_SHARD_TOKENS', 500)
  prepared = shards.prepare(config, log=lambda _: None)
  n = len(prepared.train_shards)
  assert n > 2
  assert os.path.basename(prepared.train_shards[-1]) == (
      f'train-{n - 1:05d}-of-{n:05d}.bin')
  sizes = [s['tokens'] for s in prepared.manifest['splits']['train']['shards']]
  assert max(sizes) == 500 and sum(sizes) == prepared.train_tokens
  tokens = _read_split(prepared, 'train')
  windows = pipeline.TokenWindows(prepared.train_shards, prepared.dtype, 64)
  for i in [0, 7, windows.num_windows - 1]:
    np.testing.assert_array_equal(windows.window(i),
                                  tokens[i * 64:i * 64 + 65])


def test_given_tokenizer_path_is_used(tmp_path, config):
  _write_corpus(tmp_path / 'corpus')
  first = shards.prepare(config, log=lambda _: None)
  config.tokenizer.path = first.tokenizer.path
  config.data.cache_dir = str(tmp_path / 'other_cache')
  lines = []
  second = shards.prepare(config, log=lines.append)
  assert not any('Trained' in l for l in lines)
  assert second.tokenizer.sha256 == first.tokenizer.sha256
  assert second.manifest['tokenizer']['trained'] is False
  assert not (tmp_path / 'other_cache' / 'tokenizers').exists()


def test_cache_dir_from_environment(monkeypatch, tmp_path):
  c = _base_config()
  monkeypatch.setenv('LLM_JAX_CACHE', str(tmp_path / 'env'))
  assert shards.cache_root(c.data) == str(tmp_path / 'env')
  c.data.cache_dir = str(tmp_path / 'explicit')
  assert shards.cache_root(c.data) == str(tmp_path / 'explicit')
  monkeypatch.delenv('LLM_JAX_CACHE')
  c.data.cache_dir = ''
  assert shards.cache_root(c.data) == os.path.expanduser('~/.cache/llm_jax')


def test_token_dtype():
  assert shards.token_dtype(400) == np.uint16
  assert shards.token_dtype(65536) == np.uint16
  assert shards.token_dtype(65537) == np.uint32
