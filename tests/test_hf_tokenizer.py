"""The Hugging Face tokenizer backend: ids equal transformers' AutoTokenizer, round trips, training.

Every tokenizer is built here with the ``tokenizers`` library in the layout of
the model family it stands for (nothing is downloaded): GPT-2, LLaMA-3 and
Qwen2 (byte-level BPE with their pre-tokenizer regexes), BERT (WordPiece) and
RoBERTa (byte-level BPE with <s> ... </s>).
"""

import json
import os

import ml_collections
import pytest

from llm_jax.core.errors import UserError
from llm_jax.data import hf_tokenizer
from llm_jax.data import tokenizer as tokenizer_lib

tokenizers = pytest.importorskip('tokenizers')
transformers = pytest.importorskip('transformers')
from tokenizers import (decoders, models, normalizers, pre_tokenizers,  # noqa: E402
                        processors, trainers)

TEXT = ('The quick brown fox jumps over the lazy dog. It was 1984, again!\n'
        '中文分词测试：你好，世界。今天天气很好。\n'
        'def f(x):\n    return [i ** 2 for i in range(x)]  # café naïve\n')
PAIR = 'What does the fox do?'
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
          r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?"
         r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _corpus():
  lines = [TEXT, PAIR, 'the cat sat on the mat. The dog did not.',
           '北京是中国的首都。我们喜欢学习中文和代码。',
           'import os\nfor k, v in os.environ.items():\n    print(k, v)\n']
  return [line * 3 for line in lines] * 10


def _byte_level(pre_tokenizer, specials, vocab_size=600):
  tk = tokenizers.Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizer
  tk.decoder = decoders.ByteLevel()
  tk.train_from_iterator(_corpus(), trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=specials, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tk


def _split_then_bytes(pattern):
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(pattern), behavior='isolated'),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _gpt2():
  tk = _byte_level(pre_tokenizers.ByteLevel(add_prefix_space=False), ['<|endoftext|>'])
  tk.post_processor = processors.ByteLevel(trim_offsets=False)
  return tk, dict(tokenizer_class='GPT2Tokenizer', bos_token='<|endoftext|>',
                  eos_token='<|endoftext|>', unk_token='<|endoftext|>')


def _llama3():
  bos, eos = '<|begin_of_text|>', '<|end_of_text|>'
  tk = _byte_level(_split_then_bytes(LLAMA3), [bos, eos])
  bos_id = tk.token_to_id(bos)
  tk.post_processor = processors.Sequence([
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(single=f'{bos} $A', pair=f'{bos} $A {bos} $B:1',
                                    special_tokens=[(bos, bos_id)])])
  return tk, dict(tokenizer_class='PreTrainedTokenizerFast', bos_token=bos,
                  eos_token=eos)


def _qwen2():
  tk = _byte_level(_split_then_bytes(QWEN2),
                   ['<|endoftext|>', '<|im_start|>', '<|im_end|>'])
  tk.normalizer = normalizers.NFC()
  tk.post_processor = processors.ByteLevel(trim_offsets=False)
  return tk, dict(tokenizer_class='Qwen2Tokenizer', bos_token=None,
                  eos_token='<|endoftext|>', pad_token='<|endoftext|>',
                  unk_token=None)


def _bert():
  tk = tokenizers.Tokenizer(models.WordPiece(unk_token='[UNK]'))
  tk.normalizer = normalizers.BertNormalizer(lowercase=True)
  tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tk.decoder = decoders.WordPiece()
  tk.train_from_iterator(_corpus(), trainers.WordPieceTrainer(
      vocab_size=400, special_tokens=['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'],
      show_progress=False))
  cls_id, sep_id = tk.token_to_id('[CLS]'), tk.token_to_id('[SEP]')
  tk.post_processor = processors.TemplateProcessing(
      single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
      special_tokens=[('[CLS]', cls_id), ('[SEP]', sep_id)])
  return tk, dict(tokenizer_class='BertTokenizer', do_lower_case=True)


def _roberta():
  tk = _byte_level(pre_tokenizers.ByteLevel(add_prefix_space=False),
                   ['<s>', '<pad>', '</s>', '<unk>', '<mask>'])
  tk.post_processor = processors.RobertaProcessing(('</s>', 2), ('<s>', 0),
                                                   add_prefix_space=False)
  return tk, dict(tokenizer_class='RobertaTokenizer')


FAMILIES = {'gpt2': _gpt2, 'llama3': _llama3, 'qwen2': _qwen2, 'bert': _bert,
            'roberta': _roberta}


def _save(directory, tk, config, *, files=('tokenizer.json',)) -> str:
  os.makedirs(directory, exist_ok=True)
  if 'tokenizer.json' in files:
    tk.save(os.path.join(directory, 'tokenizer.json'))
  if 'vocab.txt' in files:  # BERT's plain vocabulary, in id order.
    vocab = sorted(tk.get_vocab().items(), key=lambda kv: kv[1])
    with open(os.path.join(directory, 'vocab.txt'), 'w', encoding='utf-8') as f:
      f.write(''.join(f'{token}\n' for token, _ in vocab))
  if 'vocab.json' in files:  # GPT-2 / RoBERTa's vocabulary and merges.
    tk.model.save(directory)
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f)
  return directory


def _check_parity(ours, auto, *, lossless: bool):
  ids = ours.encode(TEXT)
  assert ids == auto(TEXT, add_special_tokens=False)['input_ids']
  assert ours.with_specials(ids)[0] == auto(TEXT)['input_ids']
  pair_ids, pair_types, _ = ours.with_specials(ids, ours.encode(PAIR))
  expected = auto(TEXT, PAIR)
  assert pair_ids == expected['input_ids']
  if 'token_type_ids' in expected:
    assert pair_types == expected['token_type_ids']
  for role in ('bos', 'eos', 'pad', 'unk', 'mask', 'cls', 'sep'):
    theirs = getattr(auto, f'{role}_token_id', None)
    if theirs is None and role in ('bos', 'eos') and ours.cls_id >= 0:
      # BERT names no bos/eos: documents are told apart by [CLS] / [SEP].
      assert getattr(ours, f'{role}_id') == (ours.cls_id if role == 'bos' else ours.sep_id)
      continue
    assert getattr(ours, f'{role}_id') == (-1 if theirs is None else theirs), role
  decoded = ours.decode(ours.with_specials(ids)[0])
  if lossless:
    assert decoded == TEXT
  else:  # WordPiece normalises: the same text transformers gives back.
    assert decoded == auto.decode(auto(TEXT)['input_ids'], skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False)
    assert ours.encode(decoded) == ids


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_ids_equal_autotokenizer(tmp_path, family):
  tk, config = FAMILIES[family]()
  directory = _save(str(tmp_path / family), tk, config)
  ours = tokenizer_lib.load(directory)
  assert isinstance(ours, hf_tokenizer.HFTokenizer)
  auto = transformers.AutoTokenizer.from_pretrained(directory)
  _check_parity(ours, auto, lossless=family != 'bert')
  # What a run keeps (tokenizer.json and the roles) loads the same anywhere.
  kept = tmp_path / 'kept'
  kept.mkdir()
  for name, data in ours.files().items():
    (kept / name).write_bytes(data)
  again = tokenizer_lib.load(str(kept / 'tokenizer.json'))
  assert again.sha256 == ours.sha256 and again.encode(TEXT) == ours.encode(TEXT)
  _check_parity(again, transformers.AutoTokenizer.from_pretrained(str(kept)),
                lossless=family != 'bert')


@pytest.mark.parametrize('family,files', [('bert', ('vocab.txt',)),
                                          ('roberta', ('vocab.json',))])
def test_plain_vocabulary_files_equal_autotokenizer(tmp_path, family, files):
  tk, config = FAMILIES[family]()
  directory = _save(str(tmp_path / family), tk, config, files=files)
  assert not os.path.exists(os.path.join(directory, 'tokenizer.json'))
  ours = tokenizer_lib.load(os.path.join(directory, files[0]))
  auto = transformers.AutoTokenizer.from_pretrained(directory)
  _check_parity(ours, auto, lossless=family != 'bert')


def _tok_cfg(kind, vocab_size=500):
  return ml_collections.ConfigDict(dict(kind=kind, vocab_size=vocab_size, lowercase=True,
                                        model_type='bpe', character_coverage=0.9995,
                                        input_sentence_size=100_000))


def test_trained_bytelevel_bpe_is_lossless_with_roberta_specials(tmp_path):
  paths = [tokenizer_lib.train(_corpus(), str(tmp_path / f'r{i}' / 'tokenizer'),
                               _tok_cfg('bytelevel_bpe'), 1, encoder=True) for i in range(2)]
  tok = tokenizer_lib.load(paths[0])
  assert tok.sha256 == tokenizer_lib.load(paths[1]).sha256, 'training must be deterministic'
  assert [tok.id_to_piece(i) for i in range(5)] == ['<s>', '<pad>', '</s>', '<unk>', '<mask>']
  assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
  for text in (TEXT, '  indented\n\n\ttabs  ', 'Ωμέγα 𝔘𝔫𝔦 ‽ 🙂'):
    assert tok.decode(tok.encode(text)) == text
  ids = tok.encode('x')
  assert tok.with_specials(ids, ids)[0] == [0, *ids, 2, 2, *ids, 2]
  # The mask token takes the space before it (RoBERTa's lstrip).
  assert tok.encode('is <mask>.')[-2] == tok.mask_id
  auto = transformers.AutoTokenizer.from_pretrained(os.path.dirname(paths[0]))
  assert auto(TEXT)['input_ids'] == tok.with_specials(tok.encode(TEXT))[0]
  assert auto.mask_token_id == 4


def test_trained_wordpiece_has_bert_specials(tmp_path):
  paths = [tokenizer_lib.train(_corpus(), str(tmp_path / f'w{i}' / 'tokenizer'),
                               _tok_cfg('wordpiece', 300), 1, encoder=True) for i in range(3)]
  tok = tokenizer_lib.load(paths[0])
  assert len({tokenizer_lib.load(p).sha256 for p in paths}) == 1, 'training is deterministic'
  assert '##s' in tok._tk.get_vocab() and tok.vocab_size > 150  # pylint: disable=protected-access
  assert [tok.id_to_piece(i) for i in range(5)] == ['[PAD]', '[UNK]', '[CLS]', '[SEP]',
                                                     '[MASK]']
  ids, types, seqs = tok.with_specials(tok.encode('the cat'), tok.encode('a dog'))
  assert ids[0] == tok.cls_id and ids.count(tok.sep_id) == 2
  assert types == [0] * (ids.index(tok.sep_id) + 1) + [1] * (len(ids) - ids.index(tok.sep_id) - 1)
  assert seqs[0] == -1 and seqs[-1] == -1
  assert tok.decode(tok.encode('The Cat SAT.')) == 'the cat sat.'


def test_offsets_point_at_the_text(tmp_path):
  sp_cfg = _tok_cfg('sentencepiece', 600)
  paths = [tokenizer_lib.train(_corpus(), str(tmp_path / k / 'tokenizer'), _tok_cfg(k, 300), 1)
           for k in ('bytelevel_bpe', 'wordpiece')]
  paths.append(tokenizer_lib.train(_corpus(), str(tmp_path / 'sp' / 'tokenizer'), sp_cfg, 1))
  text = 'The fox, 你好 café'
  for path in paths:
    tok = tokenizer_lib.load(path)
    ids, offsets = tok.encode_with_offsets(text)
    assert len(ids) == len(offsets)
    assert all(0 <= a <= b <= len(text) for a, b in offsets)
    fox = [text[a:b] for a, b in offsets if 'fox' in text[a:b].lower()]
    assert fox and fox[0].strip().lower().startswith('fox'), (path, offsets)


def test_unknown_model_type_and_missing_files_are_one_line(tmp_path):
  tk, _ = _gpt2()
  spec = json.loads(tk.to_str())
  spec['model']['type'] = 'Unigram'
  path = tmp_path / 'tokenizer.json'
  path.write_text(json.dumps(spec))
  with pytest.raises(UserError, match="model type 'Unigram'; llm_jax reads BPE .* WordPiece"):
    tokenizer_lib.load(str(path))
  with pytest.raises(UserError, match='no tokenizer.json, vocab.json'):
    tokenizer_lib.load(str(tmp_path / 'empty' if (tmp_path / 'empty').mkdir() is None else ''))
  with pytest.raises(UserError, match='nope.json: no such file'):
    tokenizer_lib.load(str(tmp_path / 'nope.json'))
  (tmp_path / 'v').mkdir()
  tk.model.save(str(tmp_path / 'v'))
  os.remove(tmp_path / 'v' / 'merges.txt')
  with pytest.raises(UserError, match='needs merges.txt'):
    tokenizer_lib.load(str(tmp_path / 'v'))


@pytest.mark.slow  # About 2 minutes on 2 busy cores (compile, checkpoint).
def test_gpt2_import_keeps_its_tokenizer_and_continues_on_text(tmp_path):
  """A decoder import with a tokenizer.json trains on plain text (init_from)."""
  torch = pytest.importorskip('torch')
  from llm_jax import train  # pylint: disable=g-import-not-at-top
  from llm_jax.interchange import hf  # pylint: disable=g-import-not-at-top
  from llm_jax.runs import init_from, vocab, workdir  # pylint: disable=g-import-not-at-top
  tk, config = _gpt2()
  hf_dir = _save(str(tmp_path / 'hf'), tk, config)
  torch.manual_seed(0)
  # The model's vocabulary is padded past the tokenizer's (as Qwen2's is).
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=tk.get_vocab_size() + 7, n_positions=32, n_embd=32, n_layer=1, n_head=2,
      bos_token_id=0, eos_token_id=0))
  model.save_pretrained(hf_dir, safe_serialization=True)
  run_dir = hf.import_hf(hf_dir, str(tmp_path / 'run'))
  assert sorted(os.listdir(run_dir)) == ['checkpoints', 'config.json', 'tokenizer.json',
                                         'tokenizer_config.json']
  run = workdir.load(run_dir)
  assert run.tokenizer.encode(TEXT) == tk.encode(TEXT).ids
  # Vocabulary extension knows it cannot grow this kind, in one line.
  with pytest.raises(UserError, match='only a SentencePiece tokenizer.model can be extended'):
    vocab.extend_vocab_workdir(run_dir, str(tmp_path / 'hf' / '*.json'), 10,
                               str(tmp_path / 'ext'))
  text = tmp_path / 'text'
  text.mkdir()
  for i in range(12):
    (text / f'd{i}.txt').write_text(' '.join(_corpus()[i % 5:i % 5 + 3]))
  c = init_from.config_from(run_dir)
  c.data.source, c.data.paths = 'text', str(text / '*.txt')
  c.data.cache_dir, c.data.val_fraction = str(tmp_path / 'cache'), 0.2
  c.train.steps, c.train.batch_size, c.train.eval_every, c.train.num_samples = 8, 8, 0, 1
  c.optim.learning_rate, c.optim.warmup_steps, c.train.sample_tokens = 3e-3, 1, 4
  c.train.sample_prompts = 'The quick'
  result = train.run(c, str(tmp_path / 'continued'))
  assert os.path.exists(tmp_path / 'continued' / 'tokenizer.json')
  assert not os.path.exists(tmp_path / 'continued' / 'tokenizer.model')
  assert result['loss_history'][8] < result['loss_history'][1]
  again = workdir.load(str(tmp_path / 'continued'))
  assert again.tokenizer.sha256 == run.tokenizer.sha256
  assert again.model_cfg.vocab_size == tk.get_vocab_size() + 7


def test_a_run_keeps_one_tokenizer_kind(tmp_path):
  from llm_jax.runs import workdir  # pylint: disable=g-import-not-at-top
  tk, config = _roberta()
  hf_tok = tokenizer_lib.load(_save(str(tmp_path / 'hf'), tk, config))
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'tokenizer.model').write_bytes(b'x')
  with pytest.raises(UserError, match='holds tokenizer.model, but this run\'s tokenizer is '
                     'tokenizer.json'):
    workdir.save_tokenizer(str(tmp_path / 'run'), hf_tok)
  (tmp_path / 'run' / 'tokenizer.json').write_bytes(b'{}')
  with pytest.raises(UserError, match='holds both tokenizer.model and tokenizer.json'):
    workdir.load_tokenizer(str(tmp_path / 'run'))
