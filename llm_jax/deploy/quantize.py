"""Weight-only int8 and int4 quantization of a run's parameters for export.

Parameters become a flat list of leaves (``Leaf``), each stored one of three
ways:

* float32 as they are (norm scales and biases: tiny, and sensitive);
* int8 with a float32 scale per output channel: the reduced axes are a
  kernel's inputs (both of the attention output's), an embedding table's D;
* int4 with a float32 scale per *group* of ``group_size`` consecutive inputs
  of each output channel (the same axes, cut into groups): two weights per
  byte, packed as ``(q_even + 8) | (q_odd + 8) << 4`` in a uint8, so every
  TensorFlow runtime (TF Serving, the Go client) reads them as plain bytes
  and the SavedModel unpacks them with integer ops inside the graph. The
  embedding tables and the LM head stay int8 unless ``int4_embeddings``: on
  configs/base.py they held 62% of int4's perplexity cost for a quarter of
  the weights (docs/compression.md).

Both are symmetric and keep zero exact (a pruned weight stays zero): int8
rounds ``w / scale`` to -127..127 with ``scale = amax / 127``, int4 to -7..7
with ``scale = amax / 7``, so the error of a weight is at most half its
scale. ``perplexities`` measures what the rounding costs on the run's
validation windows.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.core.errors import UserError
from llm_jax.data import pipeline, shards
from llm_jax.training import steps

FORMATS = ('none', 'int8', 'int4')
DEFAULT_GROUP = 64  # int4 weights per scale: 0.5 bits of scale per weight.


@dataclasses.dataclass(frozen=True)
class Leaf:
  """How one parameter is stored: float32, int8 or int4 (and its scales)."""
  name: str
  shape: tuple[int, ...]
  reduce_axes: tuple[int, ...] | None  # None: stored float32.
  bits: int = 8  # 8 or 4 when quantized.
  group: int = 0  # int4: inputs per scale (the reduced axes, padded to a multiple).


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


def _as_rows(w, axes: tuple[int, ...]):
  """``w`` with the reduced axes moved first and flattened: ``[R, C]``."""
  w = np.moveaxis(w, axes, tuple(range(len(axes))))
  rows = math.prod(w.shape[:len(axes)])
  return w.reshape(rows, -1), w.shape


def int4_group(shape: tuple[int, ...], axes: tuple[int, ...], group_size: int) -> int:
  """The group actually used: ``group_size``, or the (even) input count if fewer."""
  rows = math.prod(shape[a] for a in axes)
  return min(group_size, rows + rows % 2)


def quantize_int4(w: np.ndarray, axes: tuple[int, ...],
                  group: int) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric int4 in groups of ``group`` inputs per output channel.

  Returns:
    ``packed`` uint8 ``[R' / group, group / 2, C]`` (two weights a byte) and
    ``scale`` float32 ``[R' / group, C]``, where ``R`` inputs (the reduced
    axes, flattened) are padded with zeros to ``R'``, a multiple of ``group``.
  """
  w_RC, _ = _as_rows(np.asarray(w, np.float32), axes)
  rows, cols = w_RC.shape
  padded = -(-rows // group) * group
  w_gGC = np.pad(w_RC, ((0, padded - rows), (0, 0))).reshape(-1, group, cols)
  amax_gC = np.max(np.abs(w_gGC), axis=1)
  scale_gC = (np.maximum(amax_gC, 1e-12) / 7.0).astype(np.float32)
  q_gGC = np.clip(np.round(w_gGC / scale_gC[:, None, :]), -7, 7).astype(np.int16) + 8
  packed = (q_gGC[:, 0::2] | (q_gGC[:, 1::2] << 4)).astype(np.uint8)
  return packed, scale_gC


def dequantize_int4(packed, scale_gC, spec: Leaf):
  """The float32 weights of ``quantize_int4``'s output (numpy or jax arrays)."""
  lo = (packed & 15).astype(jnp.int8) - 8
  hi = (packed >> 4).astype(jnp.int8) - 8
  groups, half, cols = packed.shape
  q_gGC = jnp.stack([lo, hi], axis=2).reshape(groups, 2 * half, cols)
  w_RC = (q_gGC.astype(jnp.float32) * scale_gC[:, None, :]).reshape(groups * 2 * half, cols)
  axes = spec.reduce_axes
  moved = tuple(spec.shape[a] for a in axes) + tuple(
      d for i, d in enumerate(spec.shape) if i not in axes)
  w = w_RC[:math.prod(moved[:len(axes)])].reshape(moved)
  return jnp.moveaxis(w, tuple(range(len(axes))), axes)


def _is_embedding(name: str) -> bool:
  """The token and position tables and the LM head (tied or not)."""
  return name.split('/')[-1] == 'table' or name.startswith('lm_head/')


def flatten_params(params, quantize: str, group_size: int = DEFAULT_GROUP,
                   int4_embeddings: bool = False, matrices: Mapping[str, int] | None = None
                   ) -> tuple[list[Leaf], list[np.ndarray], Any]:
  """(leaf specs, the flat arrays to store, the treedef to rebuild params).

  Args:
    params: a pure dict of float32 parameters.
    quantize: 'none', 'int8' or 'int4' (``FORMATS``).
    group_size: int4 inputs per scale; even, at least 2.
    int4_embeddings: with int4, the embedding tables and LM head too
      (otherwise int8).
    matrices: ``{leaf name: input axes}`` of kernels to store as the 2-D
      ``[inputs, outputs]`` matrix their product runs on, when stored float32
      (``unflatten_params`` gives them their shape back). In a compiled
      signature the two reshapes then cancel: TensorFlow's XLA:CPU fuses a
      reshaped kernel into a one-row product as a naive dot, 4-8x slower
      (docs/performance.md#decode-at-batch-1-the-savedmodel-against-jax).
  """
  if quantize not in FORMATS:
    raise UserError(f'--quantize={quantize!r}: use one of {", ".join(FORMATS)}.')
  if quantize == 'int4' and (group_size < 2 or group_size % 2):
    raise UserError(f'--group_size={group_size}: int4 packs two weights a byte, so '
                    'a group must be an even number of at least 2 (e.g. 64 or 128).')
  with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  specs, arrays = [], []
  for path, value in with_path:
    value = np.asarray(value, np.float32)
    name = _leaf_name(path)
    axes = _reduce_axes(name, value.ndim) if quantize != 'none' else None
    if axes is None:
      specs.append(Leaf(name, value.shape, None))
      arrays.append(_as_stored(name, value, matrices))
    elif quantize == 'int8' or (_is_embedding(name) and not int4_embeddings):
      specs.append(Leaf(name, value.shape, axes))
      arrays.extend(quantize_int8(value, axes))
    else:
      group = int4_group(value.shape, axes, group_size)
      specs.append(Leaf(name, value.shape, axes, bits=4, group=group))
      arrays.extend(quantize_int4(value, axes, group))
  return specs, arrays, treedef


def _as_stored(name: str, value, matrices: Mapping[str, int] | None):
  """A float32 leaf as ``flatten_params`` stores it: 2-D if one of ``matrices``."""
  if matrices and name in matrices and value.ndim > 2:
    return value.reshape(math.prod(value.shape[:matrices[name]]), -1)
  return value


def _float_leaves(specs: Sequence[Leaf], arrays):
  """Each leaf of ``specs`` as float32 in its own shape (int8/int4 dequantised)."""
  it = iter(arrays)
  for spec in specs:
    if spec.reduce_axes is None:
      yield next(it).reshape(spec.shape)  # A no-op unless stored 2-D.
    elif spec.bits == 4:
      yield dequantize_int4(next(it), next(it), spec)
    else:
      q, scale = next(it), next(it)
      yield q.astype(jnp.float32) * scale


def unflatten_params(specs: Sequence[Leaf], arrays, treedef):
  """Rebuilds float32 params (dequantising int8/int4 leaves; works on jax arrays)."""
  return treedef.unflatten(list(_float_leaves(specs, arrays)))


def expand(specs: Sequence[Leaf], arrays, matrices: Mapping[str, int] | None = None
           ) -> tuple[list[Leaf], list]:
  """(float32 specs, arrays): stored leaves dequantised, laid out as float32 stores them.

  What a quantized export holds in memory once it has served a request: the
  same leaves ``flatten_params(params, 'none', matrices=matrices)`` gives for
  the dequantised params, so ``unflatten_params`` rebuilds the same params
  from either (works on jax arrays).
  """
  values = [_as_stored(s.name, v, matrices) for s, v in zip(specs, _float_leaves(specs, arrays))]
  return float_specs(specs), values


def float_specs(specs: Sequence[Leaf]) -> list[Leaf]:
  """The specs of ``expand``'s leaves (without computing them)."""
  return [Leaf(s.name, s.shape, None) for s in specs]


def dequantized(params, quantize: str, group_size: int = DEFAULT_GROUP,
                int4_embeddings: bool = False):
  """``params`` after a round trip through ``quantize`` (numpy float32)."""
  return jax.tree.map(np.asarray, unflatten_params(*flatten_params(
      params, quantize, group_size, int4_embeddings)))


def param_bytes(params, quantize: str, group_size: int = DEFAULT_GROUP,
                int4_embeddings: bool = False) -> int:
  """Bytes the stored arrays of ``params`` take in ``quantize``."""
  return int(sum(a.nbytes for a in flatten_params(params, quantize, group_size,
                                                  int4_embeddings)[1]))


def perplexities(run, candidates: dict, num_batches: int) -> dict:
  """Validation perplexity of each ``{name: params}`` on the run's own windows.

  Returns ``{name: perplexity, ..., 'tokens': tokens scored}``.
  """
  config = run.config
  data = shards.prepare(config, log=lambda *_: None)
  windows = pipeline.TokenWindows(data.val_shards, data.manifest['dtype'],
                                  config.data.seq_len)
  batches = list(pipeline.eval_batches(
      windows, global_batch=config.train.batch_size, num_batches=num_batches,
      process_index=0, process_count=1))
  result = {}
  for name, params in candidates.items():
    total = count = 0.0
    for b in batches:
      o = steps.eval_step(params, {k: jnp.asarray(v) for k, v in b.items()},
                          graphdef=run.graphdef)
      total += float(o['loss_sum'])
      count += float(o['count'])
    result[name] = float(np.exp(total / count))
  result['tokens'] = int(count)
  return result


def compare_formats(run, num_batches: int, group_size: int = DEFAULT_GROUP,
                    int4_embeddings: bool = False) -> dict:
  """Stored parameter bytes and validation perplexity of float32, int8 and int4.

  Returns ``{'float32'|'int8'|'int4': {'param_bytes', 'perplexity'}, 'tokens',
  'int4_group_size', 'int4_embeddings'}``.
  """
  names = {'float32': 'none', 'int8': 'int8', 'int4': 'int4'}
  kw = dict(group_size=group_size, int4_embeddings=int4_embeddings)
  ppl = perplexities(run, {name: (run.params if q == 'none' else
                                  dequantized(run.params, q, **kw))
                           for name, q in names.items()}, num_batches)
  out = {name: {'param_bytes': param_bytes(run.params, q, **kw),
                'perplexity': ppl[name]} for name, q in names.items()}
  return {**out, 'tokens': ppl['tokens'], 'int4_group_size': group_size,
          'int4_embeddings': int4_embeddings}
