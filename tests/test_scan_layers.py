"""Scan over layers: same logits as the unrolled model, layouts that map both ways."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_jax.model import transformer as model
from llm_jax.training import optim
from llm_jax.training import sharding

BASE = dict(vocab_size=97, max_len=16, num_layers=3, d_model=32, num_heads=4,
            num_kv_heads=2, head_dim=8, mlp_dim=64, dtype='float32',
            init_std=0.02, rope_theta=10_000.0)
STYLES = {
    'llama': dict(norm='rmsnorm', position='rope', mlp='swiglu', use_bias=False,
                  tie_embeddings=False, norm_eps=1e-6),
    'gpt2': dict(norm='layernorm', position='learned', mlp='gelu', use_bias=True,
                 tie_embeddings=True, norm_eps=1e-5),
}
RULES = (('batch', 'data'), ('vocab', None), ('embed', None), ('mlp', None),
         ('heads', None), ('kv_heads', None), ('head_dim', None), ('norm', None),
         ('layers', None))


def _params(m) -> dict:
  return nnx.to_pure_dict(nnx.state(m, nnx.Param))


def _randomized(cfg) -> dict:
  """Unrolled params with every value random (norm scales and biases too)."""
  rng = np.random.default_rng(1)
  p = _params(model.Transformer(cfg, rngs=nnx.Rngs(0)))
  return jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape, np.float32), p)


def _with_params(cfg, params) -> model.Transformer:
  graphdef, state = nnx.split(model.Transformer(cfg, rngs=nnx.Rngs(0)))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


@pytest.mark.parametrize('style, remat', [('llama', 'none'), ('gpt2', 'full')])
def test_scanned_logits_and_grads_equal_unrolled(style, remat):
  cfg = model.ModelConfig(**BASE, **STYLES[style], remat=remat)
  scan_cfg = dataclasses.replace(cfg, scan_layers=True)
  unrolled = _randomized(cfg)
  stacked = model.stack_blocks(unrolled)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 97, jnp.int32)

  def loss(params, c):
    logits = _with_params(c, params)(tokens)
    return jnp.mean(logits ** 2), logits

  (_, want), want_g = jax.jit(jax.value_and_grad(
      lambda p: loss(p, cfg), has_aux=True))(unrolled)
  (_, got), got_g = jax.jit(jax.value_and_grad(
      lambda p: loss(p, scan_cfg), has_aux=True))(stacked)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Gradients of the stacked layout are the unrolled ones, stacked.
  chex.assert_trees_all_close(model.unstack_blocks(got_g), want_g, atol=1e-6, rtol=0)


def test_layouts_round_trip_and_match_the_scanned_tree():
  cfg = model.ModelConfig(**BASE, **STYLES['gpt2'])
  unrolled = _randomized(cfg)
  stacked = model.stack_blocks(unrolled)
  scanned = _params(model.Transformer(dataclasses.replace(cfg, scan_layers=True),
                                      rngs=nnx.Rngs(0)))
  assert jax.tree.structure(stacked) == jax.tree.structure(scanned)
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, scanned)
  assert stacked['blocks']['mlp']['up']['kernel'].shape == (3, 32, 64)
  back = model.unstack_blocks(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(unrolled)
  chex.assert_trees_all_equal(back, unrolled)


def test_stacked_params_name_a_replicated_layers_axis():
  cfg = model.ModelConfig(**BASE, **STYLES['llama'], scan_layers=True)
  _, abstract = nnx.split(nnx.eval_shape(lambda: model.Transformer(cfg, rngs=nnx.Rngs(0))))
  names = sharding.param_names(abstract)
  assert names['blocks']['attn']['q']['kernel'] == ('layers', 'embed', 'heads', 'head_dim')
  assert names['blocks']['attn_norm']['scale'] == ('layers', 'norm')
  assert names['embed']['table'] == ('vocab', 'embed')  # Outside the blocks: as before.
  spec = sharding.logical_to_spec(names['blocks']['mlp']['up']['kernel'],
                                  (('embed', 'fsdp'), *RULES[1:]))
  assert tuple(spec) == (None, None, None)  # 'layers' is never split.


def test_weight_decay_skips_stacked_norms_and_keeps_kernels():
  cfg = model.ModelConfig(**BASE, **STYLES['gpt2'], scan_layers=True)
  mask = optim.weight_decay_mask(_params(model.Transformer(cfg, rngs=nnx.Rngs(0))))
  assert mask['blocks']['attn_norm']['scale'] is False  # [L, D]: still a vector.
  assert mask['blocks']['mlp']['up']['bias'] is False
  assert mask['blocks']['mlp']['up']['kernel'] is True
  assert mask['embed']['table'] is True
  # The unrolled tree's mask is what it always was: ndim >= 2.
  flat = optim.weight_decay_mask(_params(model.Transformer(
      dataclasses.replace(cfg, scan_layers=False), rngs=nnx.Rngs(0))))
  assert flat['blocks'][0]['attn_norm']['scale'] is False
  assert flat['blocks'][0]['attn']['q']['bias'] is True  # [N, H], as before.
