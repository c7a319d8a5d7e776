"""Sparse weights in training: pruned weights that stay exactly zero, and counting them.

``keep_zeros(tx)`` wraps the run's optimizer for recovery fine-tuning after
pruning (``config.prune.keep_zeros``, ``python -m llm_jax.prune``): it
records, at init, which kernel weights are non-zero (the *keep* mask), and on
every update it zeroes the gradients of the other weights before ``tx`` sees
them (so clipping and the Adam moments ignore them) and zeroes their updates
after, so a weight that starts at exactly zero stays exactly zero. The mask
is optimizer state: checkpoints carry it, it is sharded like its parameter,
and a resumed run needs nothing else. Gradients are still taken in one place,
``steps.train_step``; this only filters them.

``PRUNABLE`` names the weights pruning touches: the dense kernels inside the
Transformer blocks (attention q, k, v, o; MLP gate, up, down). Embeddings,
the LM head, norms and biases are never pruned: they are a small share of a
block-heavy model and the most sensitive to it. ``count`` reports parameter
counts and sparsity of a parameter tree.
"""

import fnmatch
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Paths (as ``checkpoint.flatten_params`` writes them) of prunable kernels.
PRUNABLE = ('blocks/*/attn/q/kernel', 'blocks/*/attn/k/kernel', 'blocks/*/attn/v/kernel',
            'blocks/*/attn/o/kernel', 'blocks/*/mlp/gate/kernel', 'blocks/*/mlp/up/kernel',
            'blocks/*/mlp/down/kernel')


def path_name(path) -> str:
  """'blocks/0/mlp/up/kernel' for a ``tree_flatten_with_path`` key path."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def is_prunable(name: str) -> bool:
  """Whether a parameter path is one of the ``PRUNABLE`` block kernels.

  Scanned blocks (``model.scan_layers``) are ``blocks/attn/q/kernel`` with a
  leading layers axis: they count too.
  """
  return any(fnmatch.fnmatchcase(name, p) or
             fnmatch.fnmatchcase(name, p.replace('blocks/*/', 'blocks/'))
             for p in PRUNABLE)


def keeps_zeros(config) -> bool:
  """Whether ``config`` asks for ``keep_zeros`` (runs older than pruning do not)."""
  return 'prune' in config and bool(config.prune.keep_zeros)


class KeepState(NamedTuple):
  """``keep_zeros``'s state: the wrapped optimizer's, and the keep masks."""
  inner: Any
  # Params-shaped: a bool array per prunable kernel (True: may change), a
  # bool scalar for every other parameter (always True).
  keep: Any


def keep_zeros(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` under which prunable weights that are exactly zero at init stay zero."""

  def init(params):
    # optax.tree_map_params inits on a placeholder with no leaves: mapping
    # over it returns it, so the masks are found to be params-shaped and
    # sharded like the parameters (sharding.opt_state_shardings).
    keep = jax.tree_util.tree_map_with_path(
        lambda path, p: (p != 0) if is_prunable(path_name(path))
        else jnp.ones((), bool), params)
    return KeepState(inner=tx.init(params), keep=keep)

  def update(updates, state, params=None):
    masked = jax.tree.map(lambda u, k: jnp.where(k, u, 0), updates, state.keep)
    updates, inner = tx.update(masked, state.inner, params)
    # Zero again after tx: exact zeros whatever tx adds (weight decay of a
    # zero weight is zero, but this does not rely on it).
    updates = jax.tree.map(lambda u, k: jnp.where(k, u, 0), updates, state.keep)
    return updates, KeepState(inner=inner, keep=state.keep)

  return optax.GradientTransformation(init, update)


def count(params) -> dict:
  """Parameter counts and sparsity of a parameter tree (pure dict, any layout).

  Returns:
    ``params`` (all scalars), ``params_nonzero``, ``prunable_params`` (in
    the ``PRUNABLE`` kernels), ``prunable_zeros``, ``sparsity`` (their share
    of zeros: 0.5 after 50% pruning), ``float32_bytes`` (stored dense) and
    ``sparse_bytes``: the prunable kernels as a bitmap (1 bit a weight) plus
    their non-zero values, everything else dense; what a sparse format would
    store.
  """
  total = nonzero = prunable = zeros = 0
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    value = np.asarray(value)
    nz = int(np.count_nonzero(value))
    total, nonzero = total + value.size, nonzero + nz
    if is_prunable(path_name(path)):
      prunable, zeros = prunable + value.size, zeros + value.size - nz
  return {'params': total, 'params_nonzero': nonzero, 'prunable_params': prunable,
          'prunable_zeros': zeros, 'sparsity': zeros / prunable if prunable else 0.0,
          'float32_bytes': 4 * total,
          'sparse_bytes': 4 * (total - zeros) + -(-prunable // 8)}
