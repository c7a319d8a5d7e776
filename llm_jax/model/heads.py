"""Heads on the Transformer's hidden states (heads beyond the LM head).

Two kinds:

* the reward head: ``RewardModel`` is a ``Transformer`` subclass, so its
  parameter tree is the decoder's plus ``reward_head``, and everything that
  walks a Transformer (decoding, LoRA, sharding, ``init_from``) walks it
  unchanged;
* task heads on an encoder (``model.head``: 'classification', 'qa'): the
  Transformer builds one under ``head/`` in place of its LM head
  (``task_head``).

A head's parameters are not in a plain LM checkpoint: ``init_from`` gives
them their fresh init (``is_head_path``) and leaves a source's LM head
behind where a task head replaces it.

Letters as in ``llm_jax/model/transformer.py``.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from llm_jax.model import transformer as model_lib

# ---- Reward head (reward models, llm_jax/training/objectives.py).

REWARD_HEAD = 'reward_head'


class RewardModel(model_lib.Transformer):
  """The decoder with a scalar reward head read at a response's last token.

  ``reward_head.kernel`` is ``[D, 1]`` with logical axes ``('embed', None)``,
  no bias (a Bradley-Terry loss cannot see one). The LM head stays (unused by
  the reward), so a reward model starts from any SFT run's parameters.
  """

  def __init__(self, cfg: model_lib.ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    # float32 out: rewards are compared across rows, rounding would show.
    self.reward_head = model_lib.Dense(
        (cfg.d_model,), (1,), ('embed', None), std=cfg.init_std, use_bias=False,
        dtype=cfg.compute_dtype, rngs=rngs, out_dtype=jnp.float32)

  def score(self, tokens_BT: jax.Array, last_B: jax.Array,
            positions_BT: jax.Array | None = None) -> jax.Array:
    """float32 rewards ``[B]``: the head on row b's hidden state at ``last_B[b]``.

    Rows are right-padded (causal attention: what follows ``last_B`` cannot
    change it); ``last_B`` is the position of the last token of the response.
    """
    hidden_BTD = self(tokens_BT, positions_BT, return_hidden=True)
    hidden_BD = jnp.take_along_axis(hidden_BTD, last_B[:, None, None], axis=1)[:, 0]
    return self.reward_head(hidden_BD)[:, 0]


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


def is_head_path(path: str) -> bool:
  """Whether a flat parameter path is a head's: ``reward_head/kernel``, ``head/...``."""
  return path.split('/')[0] in (REWARD_HEAD, TASK_HEAD)


def model_class(objective: str) -> type[model_lib.Transformer]:
  """The module a run of ``config.objective`` trains."""
  return RewardModel if objective == 'reward' else model_lib.Transformer
