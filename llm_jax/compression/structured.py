"""Structured pruning that shrinks the model: whole MLP hidden units removed.

A unit ``j`` of a block's MLP is one column of its gate and up kernels and
one row of its down kernel. Removing it is exact arithmetic on a smaller
model, so the result is an ordinary run with a smaller ``model.mlp_dim``:
training, export, the Go client and the benchmarks all see a genuinely
smaller (and faster) model, with no masks and nothing to keep at zero.

Importance: the unit's expected squared contribution to the block's output,
``E[h_j^2] * ||down_j||^2``, where ``h_j`` is its activation (what the down
projection receives) measured on ``calibration_batches`` batches of the run's
*training* windows (the validation split stays unseen). Every block keeps the
same number of units (``mlp_dim`` is one number), its most important ones,
in their original order.
"""

import os

from flax import nnx
import jax.numpy as jnp
import numpy as np

from llm_jax.compression import prune as prune_lib
from llm_jax.core.errors import UserError
from llm_jax.data import pipeline, shards
from llm_jax.model import transformer as model_lib
from llm_jax.runs import workdir as workdir_lib
from llm_jax.training import sparsity


class _Energy(nnx.Variable):
  """Summed squares of each hidden unit's activation (not a parameter)."""


class _MeteredDown(model_lib.Dense):
  """An MLP's down projection that also sums the square of each input unit."""

  def __init__(self, base: model_lib.Dense):  # pylint: disable=super-init-not-called
    # Not Dense.__init__: the base's own kernel and bias are kept (as LoraDense does).
    self.kernel, self.bias = base.kernel, base.bias
    self.num_in_axes, self.dtype, self.out_dtype = (
        base.num_in_axes, base.dtype, base.out_dtype)
    self.energy = _Energy(jnp.zeros(base.kernel.shape[0], jnp.float32))

  def __call__(self, h_BTF):
    h_MF = h_BTF.astype(jnp.float32).reshape(-1, h_BTF.shape[-1])
    self.energy[...] = self.energy[...] + jnp.sum(jnp.square(h_MF), axis=0)
    return super().__call__(h_BTF)


def calibration_batches(run, num_batches: int) -> list[dict]:
  """``num_batches`` batches of the run's training windows, spread evenly."""
  data = shards.prepare(run.config, log=lambda *_: None)
  windows = pipeline.TokenWindows(data.train_shards, data.manifest['dtype'],
                                  run.config.data.seq_len)
  return pipeline.eval_batches(windows, global_batch=run.config.train.batch_size,
                               num_batches=num_batches)


def unit_importance(run, params, batches) -> np.ndarray:
  """``[layers, mlp_dim]``: each unit's ``E[h_j^2] * ||down_j||^2`` on ``batches``."""
  model = nnx.merge(run.graphdef, params)
  for block in model.blocks:
    block.mlp.down = _MeteredDown(block.mlp.down)
  forward = nnx.jit(lambda m, tokens: m(tokens))
  for batch in batches:
    forward(model, jnp.asarray(batch['inputs']))
  scores = []
  for block in model.blocks:
    energy = np.asarray(block.mlp.down.energy[...])
    down_FD = np.asarray(block.mlp.down.kernel[...])
    scores.append(energy * np.sum(np.square(down_FD), axis=1))
  return np.stack(scores)


def _slice_units(params: dict, keep_LF: np.ndarray) -> dict:
  """The parameters of the model that has only units ``keep_LF[layer]``."""
  blocks = {}
  for layer, block in params['blocks'].items():
    idx = keep_LF[int(layer)]
    mlp = {}
    for name, dense in block['mlp'].items():
      out = {'kernel': dense['kernel'][idx] if name == 'down' else dense['kernel'][:, idx]}
      if 'bias' in dense:  # gate/up biases are [F]; down's is [D] and stays.
        out['bias'] = dense['bias'] if name == 'down' else dense['bias'][idx]
      mlp[name] = out
    blocks[layer] = {**block, 'mlp': mlp}
  return {**params, 'blocks': blocks}


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
  prune_lib.check_sparsity(share, 'mlp_units')
  if calibration < 1:
    raise UserError(f'--calibration_batches={calibration}: mlp_units ranks units by '
                    'their activations on at least 1 batch of training windows.')
  if os.path.exists(out) and os.listdir(out):
    raise UserError(f'--out={out} already exists and is not empty; choose a new '
                    'directory for the pruned run.')
  run = workdir_lib.load(workdir, step)
  before = run.model_cfg.mlp_dim
  keep = before - round(share * before)
  if keep == before:
    raise UserError(f'--sparsity={share} removes no unit of mlp_dim={before}; use at '
                    f'least {1 / before:.4f} (one unit).')
  params = prune_lib.plain_params(run)
  scores_LF = unit_importance(run, params, calibration_batches(run, calibration))
  # The `keep` most important units of each layer, in their original order.
  keep_LF = np.sort(np.argsort(-scores_LF, axis=1, kind='stable')[:, :keep], axis=1)
  smaller = _slice_units(params, keep_LF)
  config = prune_lib.derived_config(run, out, mlp_dim=keep)
  summary = {'pattern': 'mlp_units', 'mlp_dim_before': before, 'mlp_dim': keep,
             'removed': share, 'calibration_batches': calibration}
  path = prune_lib.write_run(run, out, config, smaller,
                             dict(pruned_from=run.workdir, step=run.step, **summary))
  return {'out': path, **summary, **sparsity.count(smaller)}
