"""LoRA: optimizer state size, merged == unmerged, only adapters train."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_jax.core import configuration
from llm_jax.interchange import hf as convert
from llm_jax.model import lora
from llm_jax.training import checkpoint
from llm_jax.training import sharding
from llm_jax.training import trainer
from llm_jax.core.errors import UserError


def _one_device_mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                           sharding.MESH_AXES)


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_optimizer_state_at_rank_8_is_under_5_percent_of_full():
  config = configuration.base_config()
  full = trainer.Trainer.build(config, config.tokenizer.vocab_size, _one_device_mesh())
  full_bytes = _bytes(jax.eval_shape(full.init_fn).opt_state)
  config.lora.rank = 8
  tr = trainer.Trainer.build(config, config.tokenizer.vocab_size, _one_device_mesh())
  state = tr.init_fn()  # Real arrays: the bytes the run would hold.
  lora_bytes = _bytes(state.opt_state)
  print(f'opt_state: full {full_bytes:,} B, LoRA r=8 {lora_bytes:,} B '
        f'({100 * lora_bytes / full_bytes:.2f}%)')
  assert lora_bytes < 0.05 * full_bytes
  # Every array in the state is an adapter moment (or a scalar counter).
  adapters = {k: v for k, v in checkpoint.flatten_params(state.params).items() if '/lora_' in k}
  assert 2 * _bytes(adapters) <= lora_bytes <= 2 * _bytes(adapters) + 64


def _lora_model(rank=4, targets='attn/q,attn/v,mlp/down,lm_head'):
  c = configuration.load_preset('tiny')
  c.lora.rank, c.lora.alpha, c.lora.targets = rank, 8.0, targets
  from llm_jax.model.transformer import ModelConfig, Transformer
  cfg = ModelConfig.from_config(c.model, vocab_size=60, max_len=32)
  make = lambda: lora.apply(Transformer(cfg, rngs=nnx.Rngs(0)), c.lora, seed=0)
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  return c, cfg, graphdef, _random_like(nnx.to_pure_dict(abstract))


def _random_like(abstract, seed=0):
  # numpy, not the model's init: compiling its many random ops is what takes
  # time on a loaded CPU, and any values serve these tests.
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32),
                      abstract)


def test_merged_logits_equal_unmerged_adapter_logits():
  c, cfg, graphdef, params = _lora_model()
  # Every parameter random, B included, so the adapters do something.
  tokens = jax.random.randint(jax.random.key(2), (2, 32), 0, 60)
  from llm_jax.model.transformer import Transformer
  plain_graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[0]
  forward = jax.jit(lambda g, p, t: nnx.merge(g, p)(t), static_argnums=0)
  unmerged = forward(graphdef, params, tokens)
  merged = forward(plain_graphdef, lora.merge(params, c.lora), tokens)
  without = forward(plain_graphdef, _drop_adapters(params), tokens)
  assert float(jnp.abs(unmerged - without).max()) > 1e-3  # The adapters matter.
  np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), rtol=0, atol=1e-5)


def _drop_adapters(tree):
  if not isinstance(tree, dict):
    return tree
  return {k: _drop_adapters(v) for k, v in tree.items() if k not in lora.ADAPTER_KEYS}


def test_training_with_lora_changes_only_adapters(tiny_config):
  config = tiny_config(lora__rank=4, lora__targets='attn/q,attn/k,attn/v,attn/o,mlp/*')
  tr = trainer.Trainer.build(config, 128, sharding.make_mesh(config.mesh))
  state = tr.init_fn()
  before = jax.tree.map(np.asarray, checkpoint.flatten_params(state.params))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 128, (8, 65)).astype(np.int32)
  batch = sharding.global_batch({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]},
                                tr.batch_sharding)
  for _ in range(3):
    state, m = tr.step_fn(state, batch)
  assert np.isfinite(float(m['loss']))
  after = checkpoint.flatten_params(state.params)
  changed = sorted(k for k in before if not np.array_equal(before[k], np.asarray(after[k])))
  assert changed and all('/lora_' in k for k in changed), changed
  assert any(k.endswith('mlp/gate/lora_b') for k in changed)


def test_targets_that_match_nothing_are_refused():
  with pytest.raises(UserError, match="lora.targets='nope' matches no dense layer"):
    _lora_model(targets='nope')


@pytest.mark.slow
def test_lora_run_exports_merged_and_reimports(tmp_path, tiny_config):
  from llm_jax import train
  from llm_jax.runs import workdir as workdir_lib
  config = tiny_config(train__steps=4, lora__rank=4, optim__learning_rate=0.05)
  train.run(config, str(tmp_path / 'run'))
  run = workdir_lib.load(str(tmp_path / 'run'))
  assert any('/lora_' in k for k in checkpoint.flatten_params(run.params))
  out = convert.export_hf(str(tmp_path / 'run'), str(tmp_path / 'hf'))
  back = workdir_lib.load(convert.import_hf(out, str(tmp_path / 'back')))
  tokens = np.arange(2 * 64).reshape(2, 64).astype(np.int32) % 1000
  np.testing.assert_allclose(np.asarray(back.model()(tokens)),
                             np.asarray(run.model()(tokens)), rtol=0, atol=1e-5)


def test_resuming_with_another_lora_rank_is_refused_by_name():
  from llm_jax.training import checkpoint
  saved = {'config': {'model': {'d_model': 8}, 'lora': {'rank': 8}}}
  with pytest.raises(UserError, match='lora.rank=8 but this run has lora.rank=4'):
    checkpoint.check_compatible(
        saved, {'config': {'model': {'d_model': 8}, 'lora': {'rank': 4}}}, 'ckpt')
  # A checkpoint from before LoRA existed still fits a run without it.
  older = {'config': {'model': {'d_model': 8}}, 'data_sha256': 'a', 'vocab_size': 3,
           'tokenizer_sha256': 'b'}
  checkpoint.check_compatible(
      older, {'config': {'model': {'d_model': 8}, 'lora': {'rank': 0}},
              'data_sha256': 'a', 'vocab_size': 3, 'tokenizer_sha256': 'b'}, 'ckpt')
