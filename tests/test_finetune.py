"""Continued pre-training from an imported checkpoint (config.init_from)."""

import os
import random
import shutil

import jax
import numpy as np
import pytest

from llm_jax import convert as convert_cli
from llm_jax.interchange import hf as convert
from llm_jax.runs import init_from as finetune
from llm_jax import train
from llm_jax.training import steps
from llm_jax.runs import workdir as workdir_lib
from llm_jax.data import pipeline, shards
from llm_jax.core.errors import UserError


_WORDS = ('the river carries cold water past old mills and quiet farms while '
          'herons wait in reeds for fish that swim upstream each spring season').split()


def write_new_corpus(directory, num_docs=120, seed=0) -> str:
  """Text of a domain the tiny tokenizer never saw: prose about a river."""
  rng = random.Random(seed)
  os.makedirs(directory, exist_ok=True)
  for i in range(num_docs):
    sentences = [' '.join(rng.choice(_WORDS) for _ in range(rng.randint(6, 14))).capitalize()
                 + '.' for _ in range(12)]
    with open(os.path.join(directory, f'doc{i:03d}.txt'), 'w') as f:
      f.write(' '.join(sentences) + '\n')
  return os.path.join(directory, '*.txt')


def import_tiny_llama(tmp_path, config) -> str:
  """A random HF LLaMA shaped like configs/tiny.py, with the tiny tokenizer, imported."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  data = shards.prepare(config, log=lambda *_: None)
  m = config.model
  hf = transformers.LlamaConfig(
      vocab_size=data.vocab_size, hidden_size=m.d_model, intermediate_size=m.mlp_dim,
      num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
      num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim, rms_norm_eps=m.norm_eps,
      rope_theta=m.rope_theta, max_position_embeddings=config.data.seq_len,
      tie_word_embeddings=False)
  torch.manual_seed(0)
  hf_dir = tmp_path / 'hf'
  transformers.LlamaForCausalLM(hf).save_pretrained(str(hf_dir), safe_serialization=True)
  shutil.copy(data.tokenizer.path, hf_dir / 'tokenizer.model')
  return convert.import_hf(str(hf_dir), str(tmp_path / 'imported'))


def _val_loss(params, graphdef, config) -> float:
  data = shards.prepare(config, log=lambda *_: None)
  windows = pipeline.TokenWindows(data.val_shards, data.manifest['dtype'], config.data.seq_len)
  total = count = 0.0
  for b in pipeline.eval_batches(windows, global_batch=config.train.batch_size,
                                 num_batches=config.train.eval_batches):
    out = steps.eval_step(params, {k: jax.numpy.asarray(v) for k, v in b.items()},
                            graphdef=graphdef)
    total += float(out['loss_sum'])
    count += float(out['count'])
  return total / count


@pytest.mark.slow
def test_continued_pretraining_from_an_import_lowers_val_loss(tmp_path, tiny_config):
  imported = import_tiny_llama(tmp_path, tiny_config())
  base = tiny_config(train__steps=40, optim__learning_rate=3e-3)
  config = finetune.config_from(os.path.join(imported, 'checkpoints', '0'), base)
  config.data.source = 'text'
  config.data.paths = write_new_corpus(str(tmp_path / 'new'))
  config.data.val_fraction = 0.1
  result = train.run(config, str(tmp_path / 'continued'))
  # The run used the import's tokenizer and started from its weights.
  src = workdir_lib.load(imported)
  assert config.tokenizer.path == os.path.join(imported, 'tokenizer.model')
  assert result['vocab_size'] == src.tokenizer.vocab_size
  assert result['val_history'][0] == pytest.approx(
      _val_loss(src.params, src.graphdef, config), rel=1e-5)
  assert result['val_loss'] < result['val_history'][0] - 1.0, result['val_history']
  # A rerun resumes its own checkpoint, not init_from again.
  again = train.run(config, str(tmp_path / 'continued'))
  assert again['val_loss'] == pytest.approx(result['val_loss'], rel=1e-5)


def test_init_from_with_another_shape_names_the_parameter(tmp_path, tiny_config):
  imported = import_tiny_llama(tmp_path, tiny_config())
  config = tiny_config(train__steps=3, model__mlp_dim=96)
  config.init_from = imported
  with pytest.raises(UserError, match=r'blocks/0/mlp/down/kernel has shape \[192, 64\] '
                     r'there but \[96, 64\] here.*model.mlp_dim: 192 there, 96 here'):
    train.run(config, str(tmp_path / 'bad'))
  config = tiny_config()
  config.init_from = str(tmp_path / 'missing')
  with pytest.raises(UserError, match='not a run directory'):
    train.run(config, str(tmp_path / 'bad2'))


CHINESE = (
    '今天天气很好，我们一起去公园散步。公园里有很多人在跑步、打太极拳和放风筝。'
    '春天来了，花园里的桃花和樱花都开了，空气中弥漫着淡淡的花香。'
    '他每天早上七点起床，先喝一杯热茶，然后坐地铁去公司上班。'
    '这家餐厅的饺子和面条非常好吃，价格也很便宜，所以周末总是排着长队。'
    '学习一门新的语言需要耐心和时间，多听多说多读多写才能进步。'
    '图书馆里很安静，学生们在认真地看书、写作业和准备考试。'
    '我的朋友住在北京，他喜欢历史，经常去故宫和长城参观。'
    '科学家们正在研究如何利用太阳能和风能来减少空气污染。'
    '小猫在窗台上睡觉，阳光照在它的身上，看起来非常舒服。'
    '晚上我们一家人坐在一起吃饭，聊天，分享今天发生的有趣的事情。'
    '这座城市的交通越来越方便，新的地铁线路下个月就要开通了。'
    '医生建议大家多喝水，少吃油炸食品，每天坚持运动半个小时。')


def test_extend_vocab_keeps_old_ids_and_logits(tmp_path, tiny_config, command_status):
  imported = import_tiny_llama(tmp_path, tiny_config())
  (tmp_path / 'zh').mkdir()
  for i in range(8):  # The same sentences in several orders: a small corpus.
    sentences = CHINESE.split('。')
    random.Random(i).shuffle(sentences)
    (tmp_path / 'zh' / f'{i}.txt').write_text('。\n'.join(sentences), encoding='utf-8')
  out = str(tmp_path / 'extended')
  assert command_status(convert_cli.main, ['extend_vocab', f'--workdir={imported}',
                       f'--text={tmp_path}/zh/*.txt', '--num_pieces=300',
                       f'--out={out}']) == 0
  base, ext = workdir_lib.load(imported), workdir_lib.load(out)
  old_v, new_v = base.tokenizer.vocab_size, ext.tokenizer.vocab_size
  assert old_v < new_v <= old_v + 300 and ext.model_cfg.vocab_size == new_v
  # Every old id is the same piece and decodes to the same text.
  for i in range(old_v):
    assert ext.tokenizer.id_to_piece(i) == base.tokenizer.id_to_piece(i)
    assert ext.tokenizer.decode([i]) == base.tokenizer.decode([i])
  code = open(shards.sources.__file__).read()[:3000]
  old_ids = base.tokenizer.encode(code)
  assert ext.tokenizer.decode(old_ids) == code == base.tokenizer.decode(old_ids)
  # Chinese now takes far fewer tokens, and still round-trips.
  before, after = base.tokenizer.encode(CHINESE), ext.tokenizer.encode(CHINESE)
  assert ext.tokenizer.decode(after) == CHINESE
  print(f"Chinese: {len(CHINESE)} chars, {len(before)} tokens before, {len(after)} after")
  assert len(after) < len(before) / 2, (len(before), len(after))
  # On old ids, the logits over the old vocabulary are the base model's.
  tokens = np.asarray([old_ids[:64], old_ids[64:128]], np.int32)
  base_logits = np.asarray(base.model()(tokens))
  ext_logits = np.asarray(ext.model()(tokens))
  assert ext_logits.shape[-1] == new_v
  np.testing.assert_allclose(ext_logits[..., :old_v], base_logits, rtol=0, atol=1e-6)
  # New rows start at the mean of the old ones.
  table = np.asarray(ext.params['embed']['table'])
  np.testing.assert_allclose(table[-1], table[:old_v].mean(0), atol=1e-6)
