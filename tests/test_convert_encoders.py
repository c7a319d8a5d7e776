"""BERT/RoBERTa import and export: logit parity with transformers, bit-exact round trips."""

import json

import chex
import numpy as np
import pytest

from llm_jax.core.errors import UserError
from llm_jax.interchange import hf as convert
from llm_jax.runs import workdir as workdir_lib
from llm_jax.training import checkpoint

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

VOCAB = 97
# Row 0 is a pair padded by one token; row 1 fills the row. No real token is
# 1 (RoBERTa's pad, whose position differs) and the pad is 1 everywhere.
TOKENS = np.array([[2, 5, 9, 33, 3, 96, 70, 12, 40, 41, 3, 1],
                   [2, 7, 7, 8, 95, 15, 60, 61, 8, 22, 30, 3]], np.int32)
TYPES = np.array([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0],
                  [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]], np.int32)
MASK = np.array([[1] * 11 + [0], [1] * 12], np.int32)


def _bert_config(**kw):
  return transformers.BertConfig(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=48, max_position_embeddings=40, type_vocab_size=2, **kw)


def _roberta_config(**kw):
  return transformers.RobertaConfig(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=48, max_position_embeddings=42, type_vocab_size=1,
      pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, **kw)


MODELS = {
    'bert_mlm': lambda: transformers.BertForMaskedLM(_bert_config()),
    'bert_mlm_tanh_gelu': lambda: transformers.BertForMaskedLM(
        _bert_config(hidden_act='gelu_new')),
    'bert_classifier': lambda: transformers.BertForSequenceClassification(
        _bert_config(num_labels=3, id2label={0: 'neg', 1: 'neutral', 2: 'pos'})),
    'bert_qa': lambda: transformers.BertForQuestionAnswering(_bert_config()),
    'roberta_mlm': lambda: transformers.RobertaForMaskedLM(_roberta_config()),
    'roberta_classifier': lambda: transformers.RobertaForSequenceClassification(
        _roberta_config(num_labels=2)),
    'roberta_qa': lambda: transformers.RobertaForQuestionAnswering(_roberta_config()),
}


def _save(model, path) -> str:
  torch.manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():  # Norms and biases too, not only their init.
      p.add_(0.05 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(str(path), safe_serialization=True)
  return str(path)


def _types(model):
  return TYPES if model.config.type_vocab_size > 1 else np.zeros_like(TYPES)


def _hf_out(model, tokens=TOKENS) -> np.ndarray:
  """The head's outputs at real tokens: logits, or [start, end] logits."""
  with torch.no_grad():
    out = model(torch.as_tensor(tokens, dtype=torch.long),
                attention_mask=torch.as_tensor(MASK, dtype=torch.long),
                token_type_ids=torch.as_tensor(_types(model), dtype=torch.long))
  if hasattr(out, 'start_logits'):
    return np.stack([out.start_logits.numpy(), out.end_logits.numpy()], -1)[MASK > 0]
  logits = out.logits.numpy()
  return logits[MASK > 0] if logits.ndim == 3 else logits


def _our_out(run, model, tokens=TOKENS) -> np.ndarray:
  out = np.asarray(run.model()(np.asarray(tokens), segment_ids_BT=MASK,
                               token_types_BT=_types(model)))
  return out if out.ndim == 2 else out[MASK > 0]


# The four the parity requirement names run by default; the variants are slow.
_VARIANTS = ('bert_mlm_tanh_gelu', 'roberta_classifier', 'roberta_qa')


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n in _VARIANTS
                                  else n for n in sorted(MODELS)])
def test_import_matches_transformers_and_round_trips(tmp_path, name):
  torch.manual_seed(0)
  model = MODELS[name]()
  hf_dir = _save(model, tmp_path / 'hf')
  run_dir = convert.import_hf(hf_dir, str(tmp_path / 'run'))
  run = workdir_lib.load(run_dir)
  m = run.model_cfg
  assert (m.kind, m.norm_position, m.head) == (
      'encoder', 'post', {'mlm': 'lm', 'classifier': 'classification', 'qa': 'qa'}[
          name.split('_')[1]])
  assert m.position_offset == (2 if name.startswith('roberta') else 0)
  ours, theirs = _our_out(run, model), _hf_out(model)
  diff = np.abs(ours - theirs).max()
  print(f'{name}: max |logit diff| vs transformers {diff:.2e}')
  assert diff <= 1e-4, diff
  if name == 'bert_classifier':
    assert run.config.task.labels == 'neg,neutral,pos'

  # llm_jax -> HF: transformers loads it and gives the same outputs ...
  out_dir = convert.export_hf(run_dir, str(tmp_path / 'hf2'))
  back = type(model).from_pretrained(out_dir).eval()
  assert np.abs(_hf_out(back) - theirs).max() <= 1e-5
  if name == 'bert_classifier':
    assert back.config.id2label == {0: 'neg', 1: 'neutral', 2: 'pos'}
  # ... and HF -> llm_jax again gives bit-identical parameters.
  again = workdir_lib.load(convert.import_hf(out_dir, str(tmp_path / 'run2')))
  chex.assert_trees_all_equal(checkpoint.flatten_params(run.params),
                              checkpoint.flatten_params(again.params), strict=True)


def test_pretraining_file_leaves_next_sentence_head_and_pooler(tmp_path):
  torch.manual_seed(1)
  model = transformers.BertForPreTraining(_bert_config())
  hf_dir = _save(model, tmp_path / 'hf')
  run = workdir_lib.load(convert.import_hf(hf_dir, str(tmp_path / 'run')))
  with torch.no_grad():
    theirs = model(torch.as_tensor(TOKENS, dtype=torch.long),
                   attention_mask=torch.as_tensor(MASK, dtype=torch.long),
                   token_type_ids=torch.as_tensor(TYPES, dtype=torch.long)
                   ).prediction_logits.numpy()[MASK > 0]
  ours = np.asarray(run.model()(TOKENS, segment_ids_BT=MASK, token_types_BT=TYPES))[MASK > 0]
  assert np.abs(ours - theirs).max() <= 1e-4


def test_encoder_configs_it_cannot_read_say_so(tmp_path):
  hf_dir = _save(transformers.BertForMaskedLM(
      _bert_config(position_embedding_type='relative_key')), tmp_path / 'hf')
  with pytest.raises(UserError, match="position_embedding_type='relative_key' is not"):
    convert.import_hf(hf_dir, str(tmp_path / 'run'))
  cfg = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  cfg.update(position_embedding_type='absolute', hidden_act='relu')
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(UserError, match="hidden_act='relu' is not supported"):
    convert.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'run'))


@pytest.mark.slow  # About 2 minutes on 2 busy CPU cores.
def test_roberta_from_scratch_fills_masks_and_exports(tmp_path, tiny_config, capsys):
  """configs/roberta.py's choices, small: byte-level BPE trained on the embedded corpus."""
  from llm_jax import fill_mask, train  # pylint: disable=g-import-not-at-top
  from llm_jax.core import configuration  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  roberta = configuration.load_preset('roberta')
  for key in ('kind', 'norm', 'norm_position', 'position', 'mlp', 'gelu', 'use_bias',
              'tie_embeddings', 'norm_eps', 'type_vocab_size', 'position_offset',
              'mlm_head'):
    c.model[key] = roberta.model[key]
  c.model.num_kv_heads = c.model.num_heads
  c.tokenizer.kind = roberta.tokenizer.kind
  c.train.steps, c.train.num_samples, c.optim.learning_rate = 40, 0, 3e-3
  result = train.run(c, str(tmp_path / 'run'))
  assert result['val_loss'] < result['val_history'][0] - 0.5
  run = workdir_lib.load(str(tmp_path / 'run'))
  tok = run.tokenizer
  assert tok.kind == 'huggingface' and (tok.bos_id, tok.pad_id, tok.eos_id, tok.mask_id) == (
      0, 1, 2, 4)
  ranked = fill_mask.main([f'--workdir={tmp_path / "run"}', '--text=import <mask>',
                           '--top_k=3'])
  probs = [p for _, p in ranked[0]]
  assert len(probs) == 3 and probs == sorted(probs, reverse=True)
  assert '<mask> 1:' in capsys.readouterr().out
  # Exported, it is a RobertaForMaskedLM whose tokenizer transformers reads:
  # the same ids, and the same logits at the mask.
  out = convert.export_hf(str(tmp_path / 'run'), str(tmp_path / 'hf'))
  model = transformers.RobertaForMaskedLM.from_pretrained(out).eval()
  auto = transformers.AutoTokenizer.from_pretrained(out)
  text = 'def f(x):\n    return <mask> + 1\n'
  ids = tok.with_specials(tok.encode(text))[0]
  assert auto(text)['input_ids'] == ids
  with torch.no_grad():
    theirs = model(torch.as_tensor([ids])).logits.numpy()[0]
  ours = np.asarray(run.model()(np.asarray([ids], np.int32)))[0]
  assert np.abs(ours - theirs).max() <= 1e-4
