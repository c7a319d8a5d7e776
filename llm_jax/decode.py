"""Sampling from a trained model: greedy and temperature, stop at end-of-text.

This first version recomputes the whole (fixed-size) window each new token,
inside one jitted ``lax.fori_loop``: simple and exact, fine for the short
samples printed at the end of training. The KV-cache decoder replaces it for
serving and export.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'greedy'))
def _generate(params, tokens_BL, lengths_B, key, temperature, *, graphdef,
              max_new_tokens: int, greedy: bool):
  """Appends ``max_new_tokens`` tokens after each row's ``lengths_B`` prefix."""
  model = nnx.merge(graphdef, params)
  rows_B = jnp.arange(tokens_BL.shape[0])

  def body(i, carry):
    tokens_BL, lengths_B = carry
    logits_BV = model(tokens_BL)[rows_B, lengths_B - 1].astype(jnp.float32)
    if greedy:
      next_B = jnp.argmax(logits_BV, axis=-1)
    else:
      next_B = jax.random.categorical(
          jax.random.fold_in(key, i), logits_BV / temperature, axis=-1)
    tokens_BL = tokens_BL.at[rows_B, lengths_B].set(next_B.astype(jnp.int32))
    return tokens_BL, lengths_B + 1

  tokens_BL, _ = jax.lax.fori_loop(0, max_new_tokens, body, (tokens_BL, lengths_B))
  return tokens_BL


def generate(graphdef, params, prompts: list[list[int]], *, max_new_tokens: int,
             temperature: float, seed: int, max_len: int, pad_id: int,
             eos_id: int) -> list[list[int]]:
  """New tokens for each prompt, cut at the first end-of-text.

  Prompts longer than ``max_len - max_new_tokens`` keep their last tokens.
  ``temperature == 0`` means greedy.
  """
  max_new_tokens = min(max_new_tokens, max_len - 1)
  keep = max_len - max_new_tokens
  prompts = [p[-keep:] or [eos_id] for p in prompts]
  tokens = np.full((len(prompts), max_len), pad_id, np.int32)
  for row, p in enumerate(prompts):
    tokens[row, :len(p)] = p
  lengths = np.array([len(p) for p in prompts], np.int32)
  out = _generate(params, tokens, lengths, jax.random.key(seed),
                  jnp.float32(max(temperature, 1e-6)), graphdef=graphdef,
                  max_new_tokens=max_new_tokens, greedy=temperature <= 0)
  out = np.asarray(jax.device_get(out))
  result = []
  for row, n in enumerate(lengths):
    new = out[row, n:n + max_new_tokens].tolist()
    result.append(new[:new.index(eos_id)] if eos_id in new else new)
  return result
