"""Instruction tuning: loss weights, packing without cross-talk, a falling loss."""

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_jax.core import configuration
from llm_jax.core.errors import UserError
from llm_jax.model import attention
from llm_jax.model import transformer as model_lib
from llm_jax import train
from llm_jax.data import sft, shards

TEMPLATE = '<|{role}|>\n{content}\n'
_COLORS = ['red', 'green', 'blue', 'black', 'white', 'yellow', 'purple', 'orange']
_THINGS = ['apple', 'car', 'house', 'bird', 'shirt', 'door', 'cup', 'book', 'lamp']


def write_jsonl(path, n=240, seed=0):
  """Question/answer pairs with a learnable pattern, in both JSONL forms."""
  rng = random.Random(seed)
  with open(path, 'w') as f:
    for i in range(n):
      color, thing = rng.choice(_COLORS), rng.choice(_THINGS)
      prompt = f'What color is the {thing}? It is {color}.'
      response = f'The {thing} is {color}.'
      if i % 2:
        obj = {'prompt': prompt, 'response': response}
      else:
        obj = {'messages': [{'role': 'system', 'content': 'Answer briefly.'},
                            {'role': 'user', 'content': prompt},
                            {'role': 'assistant', 'content': response}]}
      f.write(json.dumps(obj) + '\n')
  return str(path)


@pytest.fixture
def tokenizer(tiny_config):
  return shards.prepare(tiny_config(), log=lambda *_: None).tokenizer


def test_prompt_tokens_carry_zero_weight(tokenizer):
  messages = [{'role': 'user', 'content': 'What is two plus two?'},
              {'role': 'assistant', 'content': 'Four.'}]
  ids, weights = sft.render(messages, TEMPLATE, tokenizer)
  assert ids[-1] == tokenizer.eos_id and weights[-1] == 1
  prompt_len = len(tokenizer.encode('<|user|>\nWhat is two plus two?\n<|assistant|>\n'))
  assert not weights[:prompt_len].any()
  assert weights[prompt_len:].all()
  assert tokenizer.decode(ids[weights > 0]) == 'Four.\n'
  assert tokenizer.decode(ids) == '<|user|>\nWhat is two plus two?\n<|assistant|>\nFour.\n'
  # Packed rows: targets carry their own token's weight, padding none.
  rows = sft.pack([(ids, weights)] * 3, seq_len=3 * len(ids) + 5)
  assert rows['inputs'].shape[0] == 1
  assert rows['weights'].sum() == 3 * weights[1:].sum()
  assert list(rows['segment_ids'][0, :len(ids)]) == [1] * (len(ids) - 1) + [2]
  assert rows['positions'][0, len(ids) - 1] == 0
  assert not rows['weights'][0, rows['segment_ids'][0] == 0].any()


def test_attention_mask_keeps_segments_apart():
  seg = jnp.asarray([[1, 1, 2, 2, 2, 0]])
  mask = np.asarray(attention.attention_mask(seg, causal=True))[0]
  expected = np.array([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                       [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(mask, expected)
  full = np.asarray(attention.attention_mask(seg, causal=False))[0]
  assert full[0, 1] and not full[0, 2]


@pytest.mark.parametrize('style', ['llama', 'gpt2'])
def test_packed_example_logits_equal_its_logits_alone(style):
  c = configuration.load_preset('tiny').model
  if style == 'gpt2':
    c.update(norm='layernorm', position='learned', mlp='gelu', use_bias=True,
             num_kv_heads=c.num_heads, tie_embeddings=True)
  cfg = model_lib.ModelConfig.from_config(c, vocab_size=50, max_len=40)
  # Run under jit: eager ops on tiny arrays are what would take time.
  graphdef, params = nnx.split(nnx.eval_shape(
      lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(3))))
  rng = np.random.default_rng(3)  # Any values serve; numpy is quick.
  params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32),
                        nnx.to_pure_dict(params))
  forward = jax.jit(lambda p, *a, **k: nnx.merge(graphdef, p)(*a, **k))
  model = lambda *a, **k: forward(params, *a, **k)
  rng = np.random.default_rng(0)
  examples = [(rng.integers(4, 50, n).astype(np.int32), np.ones(n, np.float32))
              for n in (9, 13, 7)]
  rows = sft.pack(examples, seq_len=40)
  assert rows['inputs'].shape[0] == 1
  packed = model(jnp.asarray(rows['inputs']), jnp.asarray(rows['positions']),
                 segment_ids_BT=jnp.asarray(rows['segment_ids']))
  start = 0
  for ids, _ in examples:
    n = len(ids) - 1
    alone = model(jnp.asarray(ids[None, :-1]))
    np.testing.assert_allclose(np.asarray(packed[0, start:start + n]),
                               np.asarray(alone[0]), rtol=0, atol=1e-5)
    start += n


def test_sft_response_loss_falls(tmp_path, tiny_config, tokenizer):
  config = configuration.load_preset('sft')
  tiny = tiny_config(train__steps=40)
  config.model, config.mesh = tiny.model, tiny.mesh
  config.data.update(paths=write_jsonl(tmp_path / 'train.jsonl'), seq_len=128,
                     val_fraction=0.1, cache_dir=tiny.data.cache_dir)
  config.tokenizer.path = tokenizer.path
  config.optim.update(learning_rate=3e-3, warmup_steps=5)
  config.train.update(steps=40, batch_size=8, eval_every=0, eval_batches=4,
                      sample_tokens=8)
  result = train.run(config, str(tmp_path / 'run'))
  # Packed about two examples per row (58 rows for 109 train examples).
  assert result['val_loss'] < result['val_history'][0] - 2.0, result['val_history']
  assert np.isfinite(result['loss'])


def test_empty_responses_are_counted_left_out_and_refused_when_all(tmp_path, tiny_config,
                                                                   tokenizer):
  """An empty response still carries weight (closing text, end-of-text): it
  would silently teach the model to answer nothing."""
  path = tmp_path / 'chat.jsonl'
  write_jsonl(path, n=60)
  with open(path, 'a') as f:
    for i in range(140):
      f.write(json.dumps({'prompt': f'Question {i}?', 'response': ' ' * (i % 2)}) + '\n')
  config = configuration.load_preset('sft')
  config.data.update(paths=str(path), seq_len=128, val_fraction=0.1)
  config.tokenizer.path = tokenizer.path
  lines = []
  data = sft.prepare(config, log=lines.append)
  warnings = [l for l in lines if l.startswith('Warning')]
  assert len(warnings) == 1 and '140 of 200 examples (70%)' in warnings[0], lines
  assert data.manifest['examples'] == len({json.dumps(json.loads(l), sort_keys=True)
                                           for l in open(path).readlines()[:60]})
  assert data.train_rows['weights'].sum() > 0

  with open(path, 'w') as f:
    for i in range(20):
      f.write(json.dumps({'messages': [{'role': 'user', 'content': f'Hi {i}'},
                                       {'role': 'assistant', 'content': ''}]}) + '\n')
  with pytest.raises(UserError, match='All 20 examples .* have an empty response'):
    sft.prepare(config, log=lines.append)


def test_sample_prompts_keep_chat_markers_whole():
  """'|' separates prompts, but not inside <|user|>-style markers (configs/sft.py)."""
  from llm_jax.core import configuration  # pylint: disable=g-import-not-at-top
  from llm_jax.training.trainer import split_prompts  # pylint: disable=g-import-not-at-top
  sft_prompt = configuration.load_preset('sft').train.sample_prompts
  assert split_prompts(sft_prompt) == [sft_prompt]
  assert split_prompts('import os\n|def main(|class ') == ['import os\n', 'def main(', 'class ']
  assert split_prompts('<|user|>\nhi\n<|assistant|>\n|a||b') == [
      '<|user|>\nhi\n<|assistant|>\n', 'a', 'b']
