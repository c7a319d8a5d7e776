"""The heads on the Transformer's hidden states, beside its LM head.

* the masked-LM head of BERT/RoBERTa encoders (``mlm_head``: dense, GELU,
  LayerNorm, then the tied output with a bias);
* the reward head: ``transformer.RewardModel`` is a ``Transformer`` subclass
  whose parameter tree is the decoder's plus ``reward_head``, so everything
  that walks a Transformer (decoding, LoRA, sharding, ``init_from``) walks it
  unchanged;
* task heads on an encoder (``model.head``: 'classification', 'qa'): the
  Transformer builds one under ``head/`` in place of its LM head
  (``task_head``).

The heads build on ``layers.py`` only, so ``transformer.py`` imports this
module, not the other way round. A head's parameters are not in a plain LM
checkpoint: ``init_from`` gives them their fresh init (``is_head_path``) and
leaves a source's LM head behind where a task head replaces it.

Letters as in ``llm_jax/model/transformer.py``.
"""

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from llm_jax.model import layers

if TYPE_CHECKING:
  from llm_jax.model.transformer import ModelConfig

# ---- The masked-LM head (BERT/RoBERTa, llm_jax/model/transformer.py).


class MlmHead(nnx.Module):
  """BERT's masked-LM transform: ``norm(gelu(dense(x)))``, and the output bias."""

  def __init__(self, cfg: 'ModelConfig', *, rngs: nnx.Rngs):
    self.dense = layers.Dense((cfg.d_model,), (cfg.d_model,), ('embed', None),
                              std=cfg.init_std, use_bias=True,
                              dtype=cfg.compute_dtype, rngs=rngs)
    self.norm = layers.Norm(dataclasses.replace(cfg, norm='layernorm'))
    self.bias = layers.param(jnp.zeros((cfg.vocab_size,), jnp.float32), ('vocab',))
    self.tanh_gelu = cfg.gelu == 'tanh'

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    return self.norm(jax.nn.gelu(self.dense(x_BTD), approximate=self.tanh_gelu))


# ---- The reward head (``transformer.RewardModel``, llm_jax/training/objectives.py).

REWARD_HEAD = 'reward_head'


def reward_head(cfg: 'ModelConfig', *, rngs: nnx.Rngs) -> layers.Dense:
  """``[D, 1]``, axes ``('embed', None)``, no bias (a Bradley-Terry loss cannot see one).

  float32 out: rewards are compared across rows, where rounding would show.
  """
  return layers.Dense((cfg.d_model,), (1,), ('embed', None), std=cfg.init_std,
                      use_bias=False, dtype=cfg.compute_dtype, rngs=rngs,
                      out_dtype=jnp.float32)


# ---- Task heads on an encoder (model.head: 'classification', 'qa').
#
# The Transformer builds one in place of its LM head when ``model.head`` asks
# (``task_head``); its parameters live under ``head/`` and are not in an LM
# checkpoint, so ``init_from`` gives them their fresh init (``is_task_head_path``)
# and leaves the source's LM head behind.

TASK_HEAD = 'head'


class ClassificationHead(nnx.Module):
  """Sequence classification from the first token: ``out(tanh(pool(x[:, 0])))``.

  BERT's pooler + classifier and RoBERTa's classification head are both this
  shape (a ``[D, D]`` dense, tanh, a ``[D, C]`` dense), so both import here.
  """

  def __init__(self, cfg: 'ModelConfig', *, rngs: nnx.Rngs):
    kw = dict(std=cfg.init_std, use_bias=True, dtype=cfg.compute_dtype, rngs=rngs)
    self.pool = layers.Dense((cfg.d_model,), (cfg.d_model,), ('embed', None), **kw)
    self.out = layers.Dense((cfg.d_model,), (cfg.num_labels,), ('embed', None),
                            out_dtype=jnp.float32, **kw)

  def __call__(self, hidden_BTD: jax.Array) -> jax.Array:
    """float32 class logits ``[B, C]``."""
    return self.out(jnp.tanh(self.pool(hidden_BTD[:, 0])))


class SpanHead(nnx.Module):
  """Extractive QA: each token's score as an answer's start and as its end."""

  def __init__(self, cfg: 'ModelConfig', *, rngs: nnx.Rngs):
    self.out = layers.Dense((cfg.d_model,), (2,), ('embed', None), std=cfg.init_std,
                            use_bias=True, dtype=cfg.compute_dtype, rngs=rngs,
                            out_dtype=jnp.float32)

  def __call__(self, hidden_BTD: jax.Array) -> jax.Array:
    """float32 ``[B, T, 2]``: start logits at ``[..., 0]``, end logits at ``[..., 1]``."""
    return self.out(hidden_BTD)


def task_head(cfg: 'ModelConfig', *, rngs: nnx.Rngs) -> nnx.Module:
  """The head ``cfg.head`` names ('classification' or 'qa')."""
  return {'classification': ClassificationHead, 'qa': SpanHead}[cfg.head](cfg, rngs=rngs)


def is_task_head_path(path: str) -> bool:
  """Whether a flat parameter path (``head/out/kernel``) is a task head's."""
  return path.split('/')[0] == TASK_HEAD


def is_head_path(path: str) -> bool:
  """Whether a flat parameter path is a head's: ``reward_head/kernel``, ``head/...``."""
  return path.split('/')[0] in (REWARD_HEAD, TASK_HEAD)
