"""Weight-only int8 quantization of a run's parameters for export.

Parameters become a flat list of leaves (``Leaf``): float32 as they are, or
int8 with float32 scales per output channel (a kernel's input axes, an
embedding table's D, are reduced). ``int8_perplexity`` measures what the
rounding costs on the run's validation windows.
"""

import dataclasses
from typing import Any
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.data import pipeline, shards
from llm_jax.training import steps


@dataclasses.dataclass(frozen=True)
class Leaf:
  """How one parameter is stored: float as is, or int8 + float32 scales."""
  name: str
  shape: tuple[int, ...]
  reduce_axes: tuple[int, ...] | None  # None: stored float32.


def _leaf_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def _reduce_axes(name: str, ndim: int) -> tuple[int, ...] | None:
  """The axes a per-channel scale spans: a kernel's inputs, a table's D."""
  if ndim < 2:
    return None  # Norm scales and biases: tiny, kept float32.
  parts = name.split('/')
  if parts[-1] == 'table':
    return (ndim - 1,)  # One scale per row: a token's (or position's) vector.
  # The attention output kernel contracts two axes (heads, head_dim).
  return (0, 1) if parts[-2:] == ['o', 'kernel'] else (0,)


def quantize_int8(w: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric int8: ``w ~= q * scale``, one scale per output channel."""
  amax = np.max(np.abs(w), axis=axes, keepdims=True)
  scale = (np.maximum(amax, 1e-12) / 127.0).astype(np.float32)
  q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
  return q, scale


def flatten_params(params, quantize: str) -> tuple[list[Leaf], list[np.ndarray], Any]:
  """(leaf specs, the flat arrays to store, the treedef to rebuild params)."""
  import jax  # pylint: disable=g-import-not-at-top
  with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  specs, arrays = [], []
  for path, value in with_path:
    value = np.asarray(value, np.float32)
    name = _leaf_name(path)
    axes = _reduce_axes(name, value.ndim) if quantize == 'int8' else None
    specs.append(Leaf(name, value.shape, axes))
    arrays.extend(quantize_int8(value, axes) if axes is not None else [value])
  return specs, arrays, treedef


def unflatten_params(specs: Sequence[Leaf], arrays, treedef):
  """Rebuilds float32 params (dequantising int8 leaves; works on jax arrays)."""
  it = iter(arrays)
  leaves = []
  for spec in specs:
    if spec.reduce_axes is None:
      leaves.append(next(it))
    else:
      q, scale = next(it), next(it)
      leaves.append(q.astype(jnp.float32) * scale)
  return treedef.unflatten(leaves)


def int8_perplexity(run, specs, arrays, treedef, num_batches: int) -> dict:
  """Validation perplexity with float32 and with the dequantised int8 weights."""
  config = run.config
  data = shards.prepare(config, log=lambda *_: None)
  windows = pipeline.TokenWindows(data.val_shards, data.manifest['dtype'],
                                  config.data.seq_len)
  batches = list(pipeline.eval_batches(
      windows, global_batch=config.train.batch_size, num_batches=num_batches,
      process_index=0, process_count=1))
  dequant = jax.tree.map(np.asarray, unflatten_params(specs, arrays, treedef))
  result = {}
  for name, params in (('float32', run.params), ('int8', dequant)):
    total = count = 0.0
    for b in batches:
      o = steps.eval_step(params, {k: jax.numpy.asarray(v) for k, v in b.items()},
                            graphdef=run.graphdef)
      total += float(o['loss_sum'])
      count += float(o['count'])
    result[name] = float(np.exp(total / count))
  result['tokens'] = int(count)
  return result
