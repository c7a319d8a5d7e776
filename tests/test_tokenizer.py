"""Tests of llm_jax/data/tokenizer.py: lossless round trips, ids, errors."""

import os

import ml_collections
import pytest

from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.core.errors import UserError

ENGLISH = 'The quick brown fox jumps over the lazy dog. It was 1984, again!'
CHINESE = '中文分词测试：你好，世界。今天天气很好，我们去公园散步吧。'
EMOJI = 'Launch day 🙂🚀 — ship it 👍🏽 and 👨‍👩‍👧 celebrate 🎉'
CODE = ('import os\n\n\nclass Foo:\n    """Doc."""\n\n    def bar(self, x):\n'
        '\tif x:\n\t\treturn [i ** 2 for i in range(10)]\n        return None\n'
        '\n  \n# trailing spaces   \n')
UNSEEN = 'Ωμέγα ⅞ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 한국어 ℵ₀ \x00\x07 ‽'


def _corpus() -> list[str]:
  """A few KB of mixed text: prose, CJK, emoji and indented code."""
  docs = []
  for i in range(12):
    docs.append(f'{ENGLISH} Line {i} of the story, number {i * 37}.\n' * 3)
    docs.append(CHINESE * 2 + '\n')
    docs.append(EMOJI + '\n')
    docs.append(CODE.replace('Foo', f'Foo{i}').replace('bar', f'bar_{i}'))
  return docs


def _tok_cfg(vocab_size=400, model_type='bpe'):
  return ml_collections.ConfigDict(dict(
      vocab_size=vocab_size, model_type=model_type,
      character_coverage=0.9995, input_sentence_size=2_000_000))


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp('tok') / 'spm')
  path = tokenizer_lib.train_tokenizer(_corpus(), prefix, _tok_cfg(), 2)
  assert path == prefix + '.model'
  return tokenizer_lib.Tokenizer.load(path)


@pytest.mark.parametrize('text', [ENGLISH, CHINESE, EMOJI, CODE,
                                  ENGLISH + '\n' + CODE + CHINESE + EMOJI])
def test_round_trip_without_unk(tok, text):
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.unk_id not in ids


def test_unseen_characters_round_trip_by_byte_fallback(tok):
  ids = tok.encode(UNSEEN)
  assert tok.decode(ids) == UNSEEN
  assert tok.unk_id not in ids
  assert any(tok.id_to_piece(i).startswith('<0x') for i in ids)


def test_whitespace_is_kept_exactly(tok):
  for text in ['\n', '\n\n\n', '    x', '\tx\t', ' leading', 'trailing  ',
               'a\n\n    b\n\t\tc\n', '  \n  \n']:
    assert tok.decode(tok.encode(text)) == text, repr(text)
  # A newline is one dedicated piece, not byte fallback.
  assert [tok.id_to_piece(i) for i in tok.encode('\n')] == ['\n']


def test_special_ids_and_vocab(tok):
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert 300 <= tok.vocab_size <= 400
  assert len(tok.sha256) == 64
  with open(tok.path, 'rb') as f:
    assert f.read() == tok.model_bytes


def test_encode_batch_matches_encode(tok):
  texts = [ENGLISH, CHINESE, EMOJI, CODE, '']
  assert tok.encode_batch(texts, num_threads=2) == [tok.encode(t)
                                                    for t in texts]


def test_decode_out_of_range_ids_gives_unk(tok):
  good = tok.encode('ok')
  text = tok.decode(good + [-5, tok.vocab_size, 10**9])
  assert text.startswith('ok') and '⁇' in text
  # Control ids decode to nothing.
  assert tok.decode([tok.bos_id] + good + [tok.eos_id, tok.pad_id]) == 'ok'


def test_training_is_deterministic_across_threads(tmp_path):
  paths = [tokenizer_lib.train_tokenizer(_corpus(), str(tmp_path / f't{n}'),
                                         _tok_cfg(), n) for n in (1, 2, 2)]
  hashes = {tokenizer_lib.Tokenizer.load(p).sha256 for p in paths}
  assert len(hashes) == 1, 'same documents must give the same model file'
  assert sorted(os.listdir(tmp_path)) == ['t1.model', 't2.model'], (
      'no temporary files may be left behind')


def test_unigram_trains_and_round_trips(tmp_path):
  path = tokenizer_lib.train_tokenizer(_corpus(), str(tmp_path / 'u'),
                                       _tok_cfg(model_type='unigram'), 1)
  tok = tokenizer_lib.Tokenizer.load(path)
  assert tok.decode(tok.encode(CODE + EMOJI)) == CODE + EMOJI


def test_vocab_too_small_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match='tokenizer.vocab_size=200'):
    tokenizer_lib.train_tokenizer(_corpus(), str(tmp_path / 'x'),
                                  _tok_cfg(vocab_size=200), 1)


def test_bad_model_type_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="model_type='wordpiece'"):
    tokenizer_lib.train_tokenizer(_corpus(), str(tmp_path / 'x'),
                                  _tok_cfg(model_type='wordpiece'), 1)


def test_missing_model_file_is_a_user_error(tmp_path):
  path = str(tmp_path / 'nope.model')
  with pytest.raises(UserError, match='nope.model'):
    tokenizer_lib.Tokenizer.load(path)


def test_corrupt_model_file_is_a_user_error(tmp_path):
  path = tmp_path / 'bad.model'
  path.write_bytes(b'this is not a sentencepiece model\x00\x01\x02')
  with pytest.raises(UserError, match='bad.model is not a SentencePiece model') as e:
    tokenizer_lib.Tokenizer.load(str(path))
  # It is the user's file: say how to point elsewhere, never to delete it.
  assert '--config.tokenizer.path' in str(e.value) and 'delete' not in str(e.value)
