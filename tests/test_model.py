"""Tests of llm_jax/model/transformer.py: a plain-numpy reference, causality, init, names."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llm_jax.core import configuration
from llm_jax.model import transformer as model
from llm_jax.core.errors import UserError

TINY = dict(vocab_size=97, max_len=32, num_layers=2, d_model=32, num_heads=4,
            num_kv_heads=2, head_dim=8, mlp_dim=64, dtype='float32',
            init_std=0.02)
LLAMA = dict(norm='rmsnorm', position='rope', mlp='swiglu', use_bias=False,
             tie_embeddings=False, rope_theta=10_000.0, norm_eps=1e-6)
GPT2 = dict(norm='layernorm', position='learned', mlp='gelu', use_bias=True,
            tie_embeddings=True, rope_theta=10_000.0, norm_eps=1e-5)
STYLES = {'llama': LLAMA, 'gpt2': GPT2}
ALLOWED_NAMES = {'vocab', 'embed', 'mlp', 'heads', 'kv_heads', 'head_dim',
                 'norm', None}


def _cfg(style: str = 'llama', **overrides) -> model.ModelConfig:
  return model.ModelConfig(**{**TINY, **STYLES[style], **overrides})


def _tokens(B: int, T: int, vocab: int, seed: int = 0) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (B, T), 0, vocab, jnp.int32)


def _init(cfg: model.ModelConfig) -> model.Transformer:
  # Eager init: its small ops compile once per shape and are shared by the
  # tests, while a jitted init would compile every random draw anew.
  return model.Transformer(cfg, rngs=nnx.Rngs(0))


@nnx.jit
def _logits(m: model.Transformer, tokens_BT, positions_BT=None) -> jax.Array:
  return m(tokens_BT, positions_BT)


def _param_leaves(m: nnx.Module) -> list[tuple[tuple, nnx.Param]]:
  return list(nnx.to_flat_state(nnx.state(m, nnx.Param)))


def _randomize(m: nnx.Module) -> None:
  """Gives every parameter random values, so that norm scales and biases
  (1 and 0 at init) are exercised by the reference comparison."""
  rng = np.random.default_rng(1)  # numpy: nothing to compile.
  nnx.update(m, jax.tree.map(
      lambda x: x + 0.1 * rng.standard_normal(x.shape, np.float32),
      nnx.state(m, nnx.Param)))


# ---- An independent forward pass in float64 numpy, from the parameter dict.


def _np_norm(x, p, cfg):
  if cfg.norm == 'layernorm':
    x = x - x.mean(-1, keepdims=True)
  y = x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * p['scale']
  return y + p['bias'] if 'bias' in p else y


def _np_dense(x, p, num_in_axes):
  """Contracts the last num_in_axes axes of x with p['kernel'] (tensordot)."""
  y = np.tensordot(x, p['kernel'], axes=num_in_axes)
  return y + p['bias'] if 'bias' in p else y


def _np_rope(x, positions, theta):
  """HF LLaMA's rotary embedding: x*cos + rotate_half(x)*sin."""
  H = x.shape[-1]
  inv_freq = 1.0 / theta ** (np.arange(0, H, 2) / H)
  freqs = positions[..., None] * inv_freq
  emb = np.concatenate([freqs, freqs], -1)[:, :, None, :]
  rotate_half = np.concatenate([-x[..., H // 2:], x[..., :H // 2]], -1)
  return x * np.cos(emb) + rotate_half * np.sin(emb)


def _np_attention(x, p, cfg, positions):
  q = _np_dense(x, p['q'], 1)
  k = _np_dense(x, p['k'], 1)
  v = _np_dense(x, p['v'], 1)
  if cfg.position == 'rope':
    q, k = _np_rope(q, positions, cfg.rope_theta), _np_rope(k, positions,
                                                             cfg.rope_theta)
  # Repeat each key/value head for its group of query heads (HF repeat_kv).
  group = cfg.num_heads // cfg.num_kv_heads
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(cfg.head_dim)
  T = x.shape[1]
  scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return _np_dense(np.einsum('bnts,bsnh->btnh', probs, v), p['o'], 2)


def _np_mlp(x, p, cfg):
  if cfg.mlp == 'swiglu':
    g = _np_dense(x, p['gate'], 1)
    h = g / (1 + np.exp(-g)) * _np_dense(x, p['up'], 1)
  else:
    u = _np_dense(x, p['up'], 1)
    h = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
  return _np_dense(h, p['down'], 1)


def _np_forward(params, cfg, tokens):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  T = tokens.shape[1]
  positions = np.broadcast_to(np.arange(T), tokens.shape).astype(np.float64)
  x = p['embed']['table'][tokens]
  if cfg.position == 'learned':
    x = x + p['pos_embed']['table'][:T]
  for i in range(cfg.num_layers):
    b = p['blocks'][i]
    x = x + _np_attention(_np_norm(x, b['attn_norm'], cfg), b['attn'], cfg,
                          positions)
    x = x + _np_mlp(_np_norm(x, b['mlp_norm'], cfg), b['mlp'], cfg)
  x = _np_norm(x, p['final_norm'], cfg)
  if cfg.tie_embeddings:
    return x @ p['embed']['table'].T
  return x @ p['lm_head']['kernel']


@pytest.mark.parametrize('style', ['llama', 'gpt2'])
def test_matches_numpy_reference(style):
  cfg = _cfg(style)
  m = _init(cfg)
  _randomize(m)
  tokens = _tokens(2, 16, cfg.vocab_size)
  got = np.asarray(_logits(m, tokens))
  want = _np_forward(nnx.to_pure_dict(nnx.state(m, nnx.Param)), cfg,
                     np.asarray(tokens))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0,
                             err_msg=f'{style} logits drift from the reference')


def test_gqa_and_tying_are_exercised():
  # Guards the reference test: GQA needs K < N, GPT-2 tying needs no head.
  assert TINY['num_kv_heads'] < TINY['num_heads']
  m = nnx.eval_shape(lambda: model.Transformer(_cfg('gpt2'), rngs=nnx.Rngs(0)))
  assert m.lm_head is None and m.pos_embed is not None


@pytest.mark.parametrize('style', ['llama', 'gpt2'])
def test_causal(style):
  cfg = _cfg(style)
  m = _init(cfg)
  _randomize(m)
  tokens = _tokens(2, 16, cfg.vocab_size)
  changed = tokens.at[:, 9:].set(_tokens(2, 7, cfg.vocab_size, seed=5))
  a, b = np.asarray(_logits(m, tokens)), np.asarray(_logits(m, changed))
  np.testing.assert_array_equal(a[:, :9], b[:, :9])
  assert not np.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize('style', ['llama', 'gpt2'])
def test_loss_at_init_is_log_vocab(style):
  cfg = _cfg(style, vocab_size=1000)
  m = _init(cfg)
  tokens = _tokens(4, 32, cfg.vocab_size)
  loss = optax.softmax_cross_entropy_with_integer_labels(
      _logits(m, tokens[:, :-1]), tokens[:, 1:]).mean()
  assert abs(float(loss) - math.log(1000)) < 0.1, float(loss)


def test_positions():
  cfg = _cfg('llama')
  m = _init(cfg)
  _randomize(m)
  tokens = _tokens(2, 16, cfg.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  default = _logits(m, tokens)
  np.testing.assert_array_equal(default, _logits(m, tokens, positions))
  # RoPE sees only relative positions: a uniform shift changes nothing but
  # rounding, while stretching the positions changes the logits.
  np.testing.assert_allclose(default, _logits(m, tokens, positions + 3),
                             atol=1e-5)
  assert not np.allclose(default, _logits(m, tokens, 2 * positions),
                         atol=1e-3)


def test_jax_jit_over_split_state_matches_nnx_jit():
  m = _init(_cfg('llama'))
  graphdef, state = nnx.split(m)
  tokens = _tokens(2, 8, TINY['vocab_size'])
  jitted = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
  np.testing.assert_allclose(jitted, _logits(m, tokens), atol=1e-5)


def test_too_long_sequence_is_refused():
  m = nnx.eval_shape(lambda: model.Transformer(_cfg('llama', max_len=8),
                                               rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match='max_len'):
    nnx.eval_shape(m, jax.ShapeDtypeStruct((1, 9), jnp.int32))


@pytest.mark.parametrize('style', ['llama', 'gpt2'])
def test_every_param_has_logical_names(style):
  m = nnx.eval_shape(lambda: model.Transformer(_cfg(style), rngs=nnx.Rngs(0)))
  for path, param in _param_leaves(m):
    names = param.get_metadata()['out_sharding']
    assert len(names) == param.ndim, (path, names, param.shape)
    assert set(names) <= ALLOWED_NAMES, (path, names)
    assert param.dtype == jnp.float32, path


def test_init_scales():
  p = nnx.to_pure_dict(nnx.state(_init(_cfg('gpt2'))))
  block = p['blocks'][0]
  # rtol=0.2: a few thousand draws per kernel; 1/2 and 1 are far apart.
  np.testing.assert_allclose(np.std(block['mlp']['up']['kernel']), 0.02,
                             rtol=0.2)
  # Output projections are scaled by 1/sqrt(2 * num_layers) = 1/2.
  np.testing.assert_allclose(np.std(block['mlp']['down']['kernel']), 0.01,
                             rtol=0.2)
  np.testing.assert_allclose(np.std(block['attn']['o']['kernel']), 0.01,
                             rtol=0.2)
  np.testing.assert_array_equal(block['attn_norm']['scale'], 1.0)
  np.testing.assert_array_equal(block['attn']['q']['bias'], 0.0)


@pytest.mark.parametrize('style', ['llama', 'gpt2'])
@pytest.mark.parametrize('tie', [False, True])
def test_num_params_matches_tree(style, tie):
  cfg = _cfg(style, tie_embeddings=tie)
  m = nnx.eval_shape(lambda: model.Transformer(cfg, rngs=nnx.Rngs(0)))
  leaves = _param_leaves(m)
  assert cfg.num_params() == sum(p.size for _, p in leaves)
  tables = sum(p.size for path, p in leaves if path[-1] == 'table')
  assert cfg.num_params(include_embeddings=False) == cfg.num_params() - tables


@pytest.mark.parametrize('style', ['llama', 'gpt2'])
def test_bfloat16_compute(style):
  logits = {}
  for dtype in ('float32', 'bfloat16'):
    m = _init(_cfg(style, dtype=dtype))
    _randomize(m)
    assert all(p.dtype == jnp.float32 for _, p in _param_leaves(m))
    logits[dtype] = _logits(m, _tokens(2, 16, TINY['vocab_size']))
  assert logits['bfloat16'].dtype == jnp.float32
  scale = float(jnp.std(logits['float32']))
  err = float(jnp.max(jnp.abs(logits['bfloat16'] - logits['float32'])))
  # Nonzero: the bf16 path really ran; small: it computes the same function.
  assert 0 < err < 0.1 * scale, (err, scale)


def _base_model_config():
  return configuration.base_config().model


def test_from_config_reads_base():
  cfg = model.ModelConfig.from_config(_base_model_config(), vocab_size=1024,
                                      max_len=256)
  assert cfg.num_kv_heads == 2 and cfg.dtype == 'float32'
  # The base docstring promises a model of about 1M parameters.
  assert 0.9e6 < cfg.num_params() < 1.2e6


@pytest.mark.parametrize('key, value, needle', [
    ('kind', 'seq2seq', "model.kind='seq2seq'"),
    ('num_kv_heads', 3, 'model.num_kv_heads=3'),
    ('d_model', 0, 'model.d_model=0'),
    ('num_layers', -1, 'model.num_layers=-1'),
    ('norm', 'batchnorm', "'rmsnorm', 'layernorm'"),
    ('position', 'alibi', "model.position='alibi'"),
    ('mlp', 'relu', "model.mlp='relu'"),
    ('dtype', 'float16', "'float32', 'bfloat16'"),
    ('norm_eps', 0.0, 'model.norm_eps=0.0'),
    ('head_dim', 7, 'model.head_dim=7'),
])
def test_bad_config_raises_user_error(key, value, needle):
  model_cfg = _base_model_config()
  model_cfg[key] = value
  with pytest.raises(UserError) as info:
    model.ModelConfig.from_config(model_cfg, vocab_size=8192, max_len=256)
  assert needle in str(info.value)
  assert '\n' not in str(info.value)


def test_bad_vocab_size_raises_user_error():
  with pytest.raises(UserError, match='vocab_size=0'):
    model.ModelConfig.from_config(_base_model_config(), vocab_size=0,
                                  max_len=256)


def test_config_is_frozen_and_hashable():
  cfg = _cfg()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.d_model = 8
  assert hash(cfg) == hash(_cfg())


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_gives_the_same_loss_and_gradients(remat):
  base = _cfg('llama', dtype='float32')
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, base.vocab_size)

  def loss_and_grads(cfg):
    graphdef, params = nnx.split(model.Transformer(cfg, rngs=nnx.Rngs(0)))

    def loss(p):
      logits = nnx.merge(graphdef, p)(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return jax.jit(jax.value_and_grad(loss))(params)

  (l0, g0), (l1, g1) = loss_and_grads(base), loss_and_grads(
      dataclasses.replace(base, remat=remat))
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
