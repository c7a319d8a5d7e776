"""Tests of llm_jax/data/shards.py: prepare, manifest, cache, errors."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

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


PREPARE = '''
import hashlib, json, os, sys, time
from llm_jax.core import configuration
from llm_jax.data import shards
c = configuration.load_preset('tiny')
c.data.cache_dir, c.data.max_documents = sys.argv[1], 120
print('ready', flush=True)
while not os.path.exists(sys.argv[2]):  # Both start preparing at once.
  time.sleep(0.005)
lines = []
data = shards.prepare(c, log=lines.append)
# Every token this process reads, as a training run would read it.
read = {os.path.basename(p): hashlib.sha256(shards.load_shard(p, data.dtype).tobytes()).hexdigest()
        for p in data.train_shards + data.val_shards}
print(json.dumps({'dir': data.dir, 'manifest': data.manifest, 'read': read,
                  'built': any(l.startswith('Wrote token shards') for l in lines)}))
'''


def test_two_processes_preparing_one_cache_entry_agree(tmp_path):
  """Both find an invalid old entry (e.g. another version's): one rebuilds, both
  read the same whole shards, and nothing half-deleted or torn is ever read."""
  cache = tmp_path / 'cache'
  c = configuration.load_preset('tiny')
  c.data.cache_dir, c.data.max_documents = str(cache), 120
  first = shards.prepare(c, log=lambda *_: None)
  with open(first.train_shards[0], 'r+b') as f:  # Now invalid: a rebuild is due.
    f.truncate(100)
  go = tmp_path / 'go'
  env = {**os.environ, 'PYTHONPATH': str(pathlib.Path(__file__).parents[1])}
  procs = [subprocess.Popen([sys.executable, '-c', PREPARE, str(cache), str(go)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env) for _ in range(2)]
  for p in procs:
    assert p.stdout.readline().strip() == 'ready'
  go.touch()
  results = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  a, b = results
  assert [a['built'], b['built']].count(True) == 1, 'both rebuilt: no lock'
  assert a['dir'] == b['dir'] == first.dir and a['manifest'] == b['manifest']
  on_disk = {os.path.basename(p): hashlib.sha256(pathlib.Path(p).read_bytes()).hexdigest()
             for p in first.train_shards + first.val_shards}
  assert a['read'] == b['read'] == on_disk
  leftovers = [p for p in os.listdir(cache / 'shards') if '.tmp-' in p or '.stale-' in p]
  assert not leftovers
