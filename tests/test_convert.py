"""HF import/export: logit parity with transformers, exact round trips, clear errors."""

import json
import os

import chex
import numpy as np
import pytest

from llm_jax import convert as convert_cli
from llm_jax.interchange import hf as convert
from llm_jax.runs import workdir as workdir_lib
from llm_jax.training import checkpoint
from llm_jax.core.errors import UserError


torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

VOCAB = 97
TOKENS = np.array([[1, 5, 9, 33, 2, 96, 70, 12, 40, 41, 42, 3],
                   [7, 7, 7, 0, 95, 15, 60, 61, 8, 22, 30, 31]], np.int32)


def _gpt2():
  cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2,
                                n_head=4, bos_token_id=0, eos_token_id=0)
  return transformers.GPT2LMHeadModel(cfg)


def _llama(**kw):
  cfg = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
      **kw)
  return transformers.LlamaForCausalLM(cfg)


def _qwen2():
  cfg = transformers.Qwen2Config(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
      tie_word_embeddings=True, rope_theta=1e6, bos_token_id=1, eos_token_id=2)
  return transformers.Qwen2ForCausalLM(cfg)


def _mistral():
  cfg = transformers.MistralConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
      max_position_embeddings=64, sliding_window=16, bos_token_id=1, eos_token_id=2)
  return transformers.MistralForCausalLM(cfg)


def _save(model, path) -> str:
  torch.manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():  # Biases and norms too, not only their init.
      p.add_(0.05 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(str(path), safe_serialization=True)
  return str(path)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def _our_logits(run, tokens):
  return np.asarray(run.model()(np.asarray(tokens)))


@pytest.mark.parametrize('make', [_gpt2, _llama, _qwen2, _mistral,
                                  lambda: _llama(rope_scaling={'rope_type': 'linear',
                                                               'factor': 2.0})],
                         ids=['gpt2', 'llama_gqa_untied', 'qwen2_tied_bias', 'mistral',
                              'llama_linear_rope'])
def test_import_matches_transformers_logits_and_round_trips(tmp_path, make):
  torch.manual_seed(0)
  model = make()
  hf_dir = _save(model, tmp_path / 'hf')
  run_dir = convert.import_hf(hf_dir, str(tmp_path / 'run'))
  run = workdir_lib.load(run_dir)
  assert run.step == 0 and run.meta['data_sha256'] is None
  if make is _mistral:  # Within its window, sliding-window attention is causal.
    assert run.config.data.seq_len == 16 and TOKENS.shape[1] <= 16
  diff = np.abs(_our_logits(run, TOKENS) - _hf_logits(model, TOKENS)).max()
  print(f'max |logit diff| vs transformers: {diff:.2e}')
  assert diff <= 1e-4, diff

  # llm_jax -> HF: transformers loads it and gives the same logits.
  out_dir = convert.export_hf(run_dir, str(tmp_path / 'hf2'))
  back = type(model).from_pretrained(out_dir).eval()
  diff2 = np.abs(_hf_logits(back, TOKENS) - _hf_logits(model, TOKENS)).max()
  assert diff2 <= 1e-5, diff2
  # ... and HF -> llm_jax again gives bit-identical parameters.
  again = workdir_lib.load(convert.import_hf(out_dir, str(tmp_path / 'run2')))
  chex.assert_trees_all_equal(checkpoint.flatten_params(run.params),
                              checkpoint.flatten_params(again.params), strict=True)


def test_sharded_checkpoint_imports(tmp_path):
  torch.manual_seed(1)
  model = _llama()
  path = tmp_path / 'hf'
  model.save_pretrained(str(path), safe_serialization=True, max_shard_size='20KB')
  assert (path / convert.SAFETENSORS_INDEX).exists()
  run = workdir_lib.load(convert.import_hf(str(path), str(tmp_path / 'run')))
  diff = np.abs(_our_logits(run, TOKENS) - _hf_logits(model, TOKENS)).max()
  assert diff <= 1e-4, diff


def _edit_tensors(hf_dir, edit):
  from safetensors.numpy import load_file, save_file
  path = os.path.join(hf_dir, convert.SAFETENSORS_FILE)
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path)


def test_bad_keys_and_shapes_name_the_tensor(tmp_path):
  hf_dir = _save(_llama(), tmp_path / 'hf')
  key = 'model.layers.1.self_attn.k_proj.weight'

  def drop(t):
    del t[key]
  _edit_tensors(hf_dir, drop)
  with pytest.raises(UserError, match=f"no tensor '{key}'"):
    convert.import_hf(hf_dir, str(tmp_path / 'a'))

  hf_dir = _save(_llama(), tmp_path / 'hf2')
  _edit_tensors(hf_dir, lambda t: t.update({key: np.zeros((8, 32), np.float32)}))
  with pytest.raises(UserError, match=rf"'{key}' has shape \[8, 32\].*\[16, 32\]"):
    convert.import_hf(hf_dir, str(tmp_path / 'b'))

  hf_dir = _save(_llama(), tmp_path / 'hf3')
  _edit_tensors(hf_dir, lambda t: t.update({'model.extra.weight': np.zeros(3, np.float32)}))
  with pytest.raises(UserError, match="not use, first 'model.extra.weight'"):
    convert.import_hf(hf_dir, str(tmp_path / 'c'))
  assert not os.path.exists(tmp_path / 'c')  # Nothing half-written.

  cfg = json.loads((tmp_path / 'hf3' / 'config.json').read_text())
  cfg['rope_parameters'] = {'rope_type': 'yarn', 'factor': 4.0, 'rope_theta': 1e4}
  (tmp_path / 'hf3' / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(UserError, match="RoPE scaling type 'yarn' .* not supported"):
    convert.import_hf(str(tmp_path / 'hf3'), str(tmp_path / 'd'))


def test_cli_import_export_and_errors(tmp_path, capsys, command_status):
  hf_dir = _save(_gpt2(), tmp_path / 'hf')
  run_dir = str(tmp_path / 'run')
  assert command_status(convert_cli.main, ['import', f'--hf_dir={hf_dir}', f'--workdir={run_dir}']) == 0
  assert command_status(convert_cli.main, ['export', f'--workdir={run_dir}',
                       f'--out={tmp_path / "out"}', '--format=llama']) == 2
  assert 'model.norm=' in capsys.readouterr().err
  assert command_status(convert_cli.main, ['export', f'--workdir={run_dir}',
                       f'--out={tmp_path / "out"}']) == 0
  assert (tmp_path / 'out' / 'model.safetensors').exists()
  assert command_status(convert_cli.main, ['import', f'--hf_dir={tmp_path}/nope',
                       f'--workdir={tmp_path}/x']) == 2
  assert 'config.json' in capsys.readouterr().err
  assert command_status(convert_cli.main, ['--help']) == 0


def test_outputs_may_not_be_hold_or_enter_the_source_run(tmp_path, capsys, command_status):
  hf_dir = _save(_gpt2(), tmp_path / 'hf')
  run = tmp_path / 'run'
  assert command_status(convert_cli.main, ['import', f'--hf_dir={hf_dir}', f'--workdir={run}']) == 0
  before = sorted((p, p.read_bytes()) for p in run.rglob('*') if p.is_file())
  capsys.readouterr()
  for out, message in ((run, 'is or holds'), (tmp_path, 'is or holds'),
                       (run / 'hf', 'lies inside')):
    assert command_status(convert_cli.main, ['export', f'--workdir={run}', f'--out={out}']) == 2
    assert message in capsys.readouterr().err, out
    assert command_status(convert_cli.main, ['extend_vocab', f'--workdir={run}', f'--out={out}',
                 f'--text={hf_dir}/config.json', '--num_pieces=4']) == 2
    assert message in capsys.readouterr().err, out
  # An import may not land inside the directory it reads either.
  assert command_status(convert_cli.main, ['import', f'--hf_dir={hf_dir}', f'--workdir={hf_dir}/run']) == 2
  assert 'lies inside' in capsys.readouterr().err
  after = sorted((p, p.read_bytes()) for p in run.rglob('*') if p.is_file())
  assert after == before and sorted(os.listdir(tmp_path)) == ['hf', 'run']
  assert not os.path.exists(f'{hf_dir}/run')


def test_bfloat16_checkpoint_imports(tmp_path):
  torch.manual_seed(2)
  model = _llama()
  model.to(torch.bfloat16).save_pretrained(str(tmp_path / 'hf'), safe_serialization=True)
  run = workdir_lib.load(convert.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'run')))
  model = model.float()  # The bf16 values, exactly, in float32.
  diff = np.abs(_our_logits(run, TOKENS) - _hf_logits(model, TOKENS)).max()
  assert diff <= 1e-4, diff
  np.testing.assert_array_equal(
      np.asarray(run.params['embed']['table']),
      model.model.embed_tokens.weight.detach().numpy())


def test_gpt2_file_without_prefix_and_with_mask_buffers_imports(tmp_path):
  """The hub's gpt2 files: keys without 'transformer.', causal-mask buffers."""
  torch.manual_seed(3)
  model = _gpt2()
  hf_dir = _save(model, tmp_path / 'hf')

  def as_hub(t):
    for key in list(t):
      if key.startswith('transformer.'):
        t[key[len('transformer.'):]] = t.pop(key)
    t['h.0.attn.bias'] = np.tril(np.ones((1, 1, 32, 32), np.float32))
  _edit_tensors(hf_dir, as_hub)
  run = workdir_lib.load(convert.import_hf(hf_dir, str(tmp_path / 'run')))
  diff = np.abs(_our_logits(run, TOKENS) - _hf_logits(model, TOKENS)).max()
  assert diff <= 1e-4, diff
