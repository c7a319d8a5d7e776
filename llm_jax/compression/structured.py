"""Structured pruning that shrinks the model: whole MLP units or attention heads removed.

A unit ``j`` of a block's MLP is one column of its gate and up kernels and
one row of its down kernel; a query head ``n`` is ``q[:, n]`` and ``o[n]``.
Removing either is exact arithmetic on a smaller model, so the result is an
ordinary run with a smaller ``model.mlp_dim`` (or ``model.num_heads``):
training, export, the Go client and the benchmarks all see a genuinely
smaller model, with no masks and nothing to keep at zero.

Importance: what the unit (head) adds to the block's output, measured on
``calibration`` batches of the run's *training* windows (the validation split
stays unseen). For an input ``x_i`` of the down (attention output)
projection, ``E[x_i^2] * ||W_i||^2`` (``W_i`` the kernel row it multiplies)
is the expected squared size of its contribution; a unit is one input, a head
the sum over its ``head_dim`` inputs. Every block keeps the same number of
units (``mlp_dim`` is one number) or heads per key/value group (grouped-query
attention needs ``num_heads / num_kv_heads`` whole), its most important ones,
in their original order.
"""

import os

from flax import nnx
import jax.numpy as jnp
import numpy as np

from llm_jax.compression import prune as prune_lib
from llm_jax.core.errors import UserError
from llm_jax.data import pipeline, shards
from llm_jax.model import layers
from llm_jax.runs import workdir as workdir_lib
from llm_jax.training import sparsity


class _Energy(nnx.Variable):
  """Summed squares of each input of a dense layer (not a parameter)."""


class _Metered(layers.Dense):
  """A dense layer that also sums the square of each of its inputs."""

  def __init__(self, base: layers.Dense):  # pylint: disable=super-init-not-called
    # Not Dense.__init__: the base's own kernel and bias are kept (as LoraDense does).
    self.kernel, self.bias = base.kernel, base.bias
    self.num_in_axes, self.dtype, self.out_dtype, self.cpu_matmul = (
        base.num_in_axes, base.dtype, base.out_dtype, base.cpu_matmul)
    self.in_shape = tuple(base.kernel.shape[:base.num_in_axes])
    self.energy = _Energy(jnp.zeros(self.in_shape, jnp.float32))

  def __call__(self, x):
    x32 = x.astype(jnp.float32).reshape((-1,) + self.in_shape)
    self.energy[...] = self.energy[...] + jnp.sum(jnp.square(x32), axis=0)
    return super().__call__(x)


def calibration_batches(run, num_batches: int) -> list[dict]:
  """``num_batches`` batches of the run's training windows, spread evenly."""
  data = shards.prepare(run.config, log=lambda *_: None)
  windows = pipeline.TokenWindows(data.train_shards, data.manifest['dtype'],
                                  run.config.data.seq_len)
  return pipeline.eval_batches(windows, global_batch=run.config.train.batch_size,
                               num_batches=num_batches)


def input_importance(run, params, batches, layer: str) -> np.ndarray:
  """``E[x_i^2] * ||W_i||^2`` for each input ``i`` of ``layer`` in every block.

  Args:
    layer: 'mlp/down' (inputs: MLP units, result ``[layers, F]``) or
      'attn/o' (inputs: heads x head_dim, result ``[layers, N, H]``).
  """
  parent, name = layer.split('/')
  model = nnx.merge(run.graphdef, params)
  for block in model.blocks:
    setattr(getattr(block, parent), name, _Metered(getattr(getattr(block, parent), name)))
  forward = nnx.jit(lambda m, tokens: m(tokens))
  for batch in batches:
    forward(model, jnp.asarray(batch['inputs']))
  scores = []
  for block in model.blocks:
    dense = getattr(getattr(block, parent), name)
    kernel = np.asarray(dense.kernel[...])
    out_axes = tuple(range(dense.num_in_axes, kernel.ndim))
    scores.append(np.asarray(dense.energy[...]) * np.sum(np.square(kernel), axis=out_axes))
  return np.stack(scores)


def _slice(params: dict, keep: np.ndarray, cut: dict) -> dict:
  """Keeps indices ``keep[layer]`` along the axis ``cut[(module, dense)]`` names.

  ``cut`` maps e.g. ``('mlp', 'up')`` to the kernel axis that is cut; a bias
  is cut along the same output axis (counted from its kernel's inputs).
  """
  blocks = {}
  for layer, block in params['blocks'].items():
    idx, block = keep[int(layer)], dict(block)
    for (module, name), axis in cut.items():
      dense = dict(block[module][name])
      dense['kernel'] = np.take(dense['kernel'], idx, axis=axis)
      num_in = dense['kernel'].ndim - (dense['bias'].ndim if 'bias' in dense else 0)
      if 'bias' in dense and axis >= num_in:  # An output axis: the bias has it too.
        dense['bias'] = np.take(dense['bias'], idx, axis=axis - num_in)
      block[module] = {**block[module], name: dense}
    blocks[layer] = block
  return {**params, 'blocks': blocks}


def _check(share, calibration: int, out: str, pattern: str) -> None:
  prune_lib.check_sparsity(share, pattern)
  if calibration < 1:
    raise UserError(f'--calibration_batches={calibration}: {pattern} ranks by activations '
                    'on at least 1 batch of training windows.')
  if os.path.exists(out) and os.listdir(out):
    raise UserError(f'--out={out} already exists and is not empty; choose a new '
                    'directory for the pruned run.')


def _write(run, out: str, params, changes: dict, summary: dict) -> dict:
  config = prune_lib.derived_config(run, out, **changes)
  path = prune_lib.write_run(run, out, config, params,
                             dict(pruned_from=run.workdir, step=run.step, **summary))
  return {'out': path, **summary, **sparsity.count(params)}


def remove_mlp_units(workdir: str, out: str, *, share: float | None,
                     calibration: int = 8, step: int | None = None) -> dict:
  """Removes ``share`` of every block's MLP units (the least important) into ``out``.

  Returns:
    ``{'out', 'pattern', 'mlp_dim_before', 'mlp_dim', 'removed'}`` and the
    ``sparsity.count`` of the smaller model (``params`` is its size).

  Raises:
    UserError: ``share`` outside [0, 1) or removing no unit, ``out`` in use,
      ``calibration`` < 1, or not a run.
  """
  _check(share, calibration, out, 'mlp_units')
  run = workdir_lib.load(workdir, step)
  before = run.model_cfg.mlp_dim
  keep = before - round(share * before)
  if keep == before:
    raise UserError(f'--sparsity={share} removes no unit of mlp_dim={before}; use at '
                    f'least {1 / before:.4f} (one unit).')
  params = prune_lib.plain_params(run)
  scores_LF = input_importance(run, params, calibration_batches(run, calibration),
                               'mlp/down')
  # The `keep` most important units of each layer, in their original order.
  keep_LF = np.sort(np.argsort(-scores_LF, axis=1, kind='stable')[:, :keep], axis=1)
  cut = {('mlp', 'up'): 1, ('mlp', 'down'): 0}
  if run.model_cfg.mlp == 'swiglu':
    cut[('mlp', 'gate')] = 1
  return _write(run, out, _slice(params, keep_LF, cut), {'mlp_dim': keep},
                {'pattern': 'mlp_units', 'mlp_dim_before': before, 'mlp_dim': keep,
                 'removed': share, 'calibration_batches': calibration})


def remove_heads(workdir: str, out: str, *, share: float | None,
                 calibration: int = 8, step: int | None = None) -> dict:
  """Removes ``share`` of every block's query heads, the same number per KV group.

  Returns:
    ``{'out', 'pattern', 'num_heads_before', 'num_heads', 'removed'}`` and
    the ``sparsity.count`` of the smaller model.

  Raises:
    UserError: as ``remove_mlp_units``, or a share that is not a whole number
      of heads in each key/value group.
  """
  _check(share, calibration, out, 'heads')
  run = workdir_lib.load(workdir, step)
  cfg = run.model_cfg
  group = cfg.num_heads // cfg.num_kv_heads
  drop = round(share * group)
  if not 0 < drop < group:
    raise UserError(
        f'--pattern=heads removes whole query heads from each of the {cfg.num_kv_heads} '
        f'key/value groups of {group} (num_heads={cfg.num_heads}); --sparsity={share} '
        f'removes {drop} of {group}. Use a multiple of 1/{group} below 1'
        + (', or prune another way: one head per group cannot lose any.' if group == 1
           else '.'))
  params = prune_lib.plain_params(run)
  scores_LNH = input_importance(run, params, calibration_batches(run, calibration),
                                'attn/o')
  # Query head n reads key/value head n // group: rank heads within each group.
  scores_LKG = scores_LNH.sum(axis=2).reshape(len(scores_LNH), cfg.num_kv_heads, group)
  best_LKg = np.sort(np.argsort(-scores_LKG, axis=2, kind='stable')[:, :, :group - drop],
                     axis=2)
  keep_LN = (best_LKg + group * np.arange(cfg.num_kv_heads)[None, :, None]).reshape(
      len(scores_LNH), -1)
  heads = cfg.num_kv_heads * (group - drop)
  return _write(run, out, _slice(params, keep_LN, {('attn', 'q'): 1, ('attn', 'o'): 0}),
                {'num_heads': heads},
                {'pattern': 'heads', 'num_heads_before': cfg.num_heads, 'num_heads': heads,
                 'removed': drop / group, 'calibration_batches': calibration})
