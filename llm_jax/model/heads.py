"""Heads on the Transformer's hidden states (task heads beyond the LM head).

Letters as in ``llm_jax/model/transformer.py``.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from llm_jax.model import transformer as model_lib

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

  def __init__(self, cfg: 'model_lib.ModelConfig', *, rngs: nnx.Rngs):
    kw = dict(std=cfg.init_std, use_bias=True, dtype=cfg.compute_dtype, rngs=rngs)
    self.pool = model_lib.Dense((cfg.d_model,), (cfg.d_model,), ('embed', None), **kw)
    self.out = model_lib.Dense((cfg.d_model,), (cfg.num_labels,), ('embed', None),
                               out_dtype=jnp.float32, **kw)

  def __call__(self, hidden_BTD: jax.Array) -> jax.Array:
    """float32 class logits ``[B, C]``."""
    return self.out(jnp.tanh(self.pool(hidden_BTD[:, 0])))


class SpanHead(nnx.Module):
  """Extractive QA: each token's score as an answer's start and as its end."""

  def __init__(self, cfg: 'model_lib.ModelConfig', *, rngs: nnx.Rngs):
    self.out = model_lib.Dense((cfg.d_model,), (2,), ('embed', None), std=cfg.init_std,
                               use_bias=True, dtype=cfg.compute_dtype, rngs=rngs,
                               out_dtype=jnp.float32)

  def __call__(self, hidden_BTD: jax.Array) -> jax.Array:
    """float32 ``[B, T, 2]``: start logits at ``[..., 0]``, end logits at ``[..., 1]``."""
    return self.out(hidden_BTD)


def task_head(cfg: 'model_lib.ModelConfig', *, rngs: nnx.Rngs) -> nnx.Module:
  """The head ``cfg.head`` names ('classification' or 'qa')."""
  return {'classification': ClassificationHead, 'qa': SpanHead}[cfg.head](cfg, rngs=rngs)


def is_task_head_path(path: str) -> bool:
  """Whether a flat parameter path (``head/out/kernel``) is a task head's."""
  return path.split('/')[0] == TASK_HEAD
