"""Heads on the Transformer's hidden states (task heads beyond the LM head).

Each head is a small module on the final-normed hidden states
(``Transformer(..., return_hidden=True)``); the model that carries one is a
``Transformer`` subclass, so its parameter tree is the decoder's plus the
head's own entry, and everything that walks a Transformer (decoding, LoRA,
sharding, ``init_from``) walks it unchanged. A head's parameters are not in
a plain LM checkpoint: ``init_from`` gives them their fresh init
(``is_head_path``).

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


def is_head_path(path: str) -> bool:
  """Whether a flat parameter path (``reward_head/kernel``) is a head's."""
  return path.split('/')[0] == REWARD_HEAD


def model_class(objective: str) -> type[model_lib.Transformer]:
  """The module a run of ``config.objective`` trains."""
  return RewardModel if objective == 'reward' else model_lib.Transformer
