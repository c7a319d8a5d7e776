"""Magnitude pruning of a run's block kernels into a new run (``python -m llm_jax.prune``).

What is pruned: the dense kernels inside the Transformer blocks (attention
q, k, v, o; MLP gate, up, down: ``sparsity.PRUNABLE``), or those of them that
``targets`` names. Embeddings, the LM head, norms and biases are kept whole.
Each kernel is seen as the matrix ``[inputs, outputs]`` it multiplies with
(the attention output's inputs are heads x head_dim). Patterns:

* ``unstructured``: the ``sparsity`` share of weights with the smallest
  ``|w|``, in each kernel (``scope='layer'``) or over all of them together
  (``scope='global'``);
* ``N:M`` (e.g. ``2:4``): of every M consecutive inputs of each output, the
  N largest stay (the layout sparse tensor cores run); the sparsity is
  ``1 - N/M``, and the inputs must be a multiple of M;
* ``rows``: whole output channels (rows of the ``[out, in]`` weight as
  PyTorch writes it) with the smallest L2 norm, in each kernel.

The result is an ordinary run directory (``runs.workdir.write``): the pruned
weights are stored as exact zeros, the keep masks beside them in
``prune_mask.safetensors`` (1 = kept), and its config sets
``prune.keep_zeros``, so fine-tuning from it (``configs/continued.py:OUT``)
keeps the zeros (``training/sparsity.py``). Removing whole MLP units or
attention heads, which makes the model smaller, is ``compression/structured.py``.
"""

import fnmatch
import math
import os

import jax
import ml_collections
import numpy as np
from safetensors.numpy import save as safetensors_save

from llm_jax.core.configuration import base_config
from llm_jax.core.errors import UserError
from llm_jax.model import lora
from llm_jax.model import transformer as model_lib
from llm_jax.runs import workdir as workdir_lib
from llm_jax.training import checkpoint, sparsity

MASK_FILE = 'prune_mask.safetensors'
SCOPES = ('layer', 'global')
MASK_PATTERNS = ('unstructured', 'N:M (e.g. 2:4)', 'rows')


def check_sparsity(value: float | None, pattern: str) -> None:
  """One line if ``value`` is not a share in [0, 1)."""
  if value is None:
    raise UserError(f'--pattern={pattern} needs --sparsity, the share to remove, '
                    'e.g. --sparsity=0.5.')
  if not 0 <= value < 1:
    raise UserError(f'--sparsity={value} must be in [0, 1): the share of weights to '
                    'remove (0.5 removes half; 1 would remove them all).')


def parse_n_m(pattern: str) -> tuple[int, int] | None:
  """(N, M) of an 'N:M' pattern, None for another pattern; UserError if malformed."""
  if ':' not in pattern:
    return None
  try:
    n, m = (int(x) for x in pattern.split(':'))
  except ValueError:
    n = m = 0
  if not 0 < n < m:
    raise UserError(f'--pattern={pattern} is not N:M with 0 < N < M (e.g. 2:4: two '
                    'weights kept in every four).')
  return n, m


def selected_kernels(params, targets: str = '') -> dict[str, np.ndarray]:
  """The prunable kernels (``{'blocks/0/mlp/up/kernel': array}``) ``targets`` names.

  ``targets``: comma-separated fnmatch patterns matched against paths such as
  'blocks/0/mlp/up' (a pattern also matches any path it ends: 'mlp/*' is
  every MLP kernel); '' means all of them.
  """
  flat = {k: np.asarray(v, np.float32) for k, v in checkpoint.flatten_params(params).items()
          if sparsity.is_prunable(k)}
  patterns = [p.strip() for p in targets.split(',') if p.strip()]
  if not patterns:
    return flat
  chosen = {k: v for k, v in flat.items()
            if any(fnmatch.fnmatchcase(k.removesuffix('/kernel'), p) or
                   fnmatch.fnmatchcase(k.removesuffix('/kernel'), '*/' + p)
                   for p in patterns)}
  if not chosen:
    names = ', '.join(k.removesuffix('/kernel') for k in list(flat)[:7])
    raise UserError(f'--targets={targets!r} matches no prunable kernel; they are named '
                    f'like {names} (embeddings, the LM head and norms are not pruned).')
  return chosen


def as_matrix(name: str, w: np.ndarray) -> np.ndarray:
  """A kernel as the ``[inputs, outputs]`` matrix it multiplies with."""
  num_in = 2 if name.endswith('attn/o/kernel') else 1
  return w.reshape(math.prod(w.shape[:num_in]), -1)


def _smallest(scores: np.ndarray, count: int) -> np.ndarray:
  """A bool mask of ``scores``' shape, False at its ``count`` smallest entries."""
  keep = np.ones(scores.size, bool)
  if count:
    keep[np.argpartition(scores.ravel(), count - 1)[:count]] = False
  return keep.reshape(scores.shape)


def unstructured_masks(kernels: dict, share: float, scope: str) -> dict[str, np.ndarray]:
  """Keep masks without the ``share`` smallest |w|, per kernel or over all of them."""
  if scope == 'layer' or not kernels:
    return {k: _smallest(np.abs(w), round(share * w.size)) for k, w in kernels.items()}
  names = list(kernels)
  scores = np.concatenate([np.abs(kernels[k]).ravel() for k in names])
  keep = _smallest(scores, round(share * scores.size))
  ends = np.cumsum([kernels[k].size for k in names])
  return {k: part.reshape(kernels[k].shape)
          for k, part in zip(names, np.split(keep, ends[:-1]))}


def n_m_masks(kernels: dict, n: int, m: int) -> dict[str, np.ndarray]:
  """Keep masks of the ``n`` largest |w| in every ``m`` consecutive inputs of an output."""
  masks = {}
  for name, w in kernels.items():
    w_IO = as_matrix(name, w)
    if w_IO.shape[0] % m:
      raise UserError(f'--pattern={n}:{m} groups {m} consecutive inputs of each output, '
                      f'but {name} has {w_IO.shape[0]} inputs, not a multiple of {m}. '
                      f'Leave it out with --targets, or pick another M.')
    groups = np.abs(w_IO).reshape(-1, m, w_IO.shape[1])
    # Rank within each group: the m - n smallest go.
    ranks = np.argsort(np.argsort(groups, axis=1, kind='stable'), axis=1, kind='stable')
    masks[name] = (ranks >= m - n).reshape(w.shape)
  return masks


def row_masks(kernels: dict, share: float) -> dict[str, np.ndarray]:
  """Keep masks without the ``share`` of output channels of least L2 norm, per kernel."""
  masks = {}
  for name, w in kernels.items():
    w_IO = as_matrix(name, w)
    keep_O = _smallest(np.linalg.norm(w_IO, axis=0), round(share * w_IO.shape[1]))
    masks[name] = np.broadcast_to(keep_O, w_IO.shape).reshape(w.shape)
  return masks


def plain_params(run) -> dict:
  """The run's parameters without LoRA adapters (merged into their kernels)."""
  params = run.params
  if any('/lora_' in k for k in checkpoint.flatten_params(params)):
    params = lora.merge(params, run.config.lora)
  return jax.tree.map(np.asarray, params)


def _fill_missing(config, base) -> None:
  """Adds the keys of ``base`` that ``config`` lacks, section by section."""
  for key in base.keys():
    if key not in config:
      config[key] = ml_collections.ConfigDict(base[key].to_dict()) if hasattr(
          base[key], 'keys') else base[key]
    elif hasattr(base[key], 'keys'):
      _fill_missing(config[key], base[key])


def derived_config(run, out: str, **model_changes) -> ml_collections.ConfigDict:
  """The source's config for a run derived from it (no adapters, no init_from).

  Keys added to configs/base.py since the source was trained (its
  config.json lacks them) get their defaults.
  """
  config = ml_collections.ConfigDict(run.config.to_dict())
  _fill_missing(config, base_config())
  config.name = os.path.basename(os.path.abspath(out))
  config.init_from = ''
  config.lora.rank = 0
  for key, value in model_changes.items():
    config.model[key] = value
  return config


def write_run(run, out: str, config, params: dict, source: dict,
              extra_files: dict | None = None) -> str:
  """Writes ``params`` as a new run (stacked again if the source scanned its layers)."""
  if config.model.scan_layers:
    params = model_lib.stack_blocks(params)
  return workdir_lib.write(out, config, params, vocab_size=run.model_cfg.vocab_size,
                           tokenizer=run.tokenizer, source=source, extra_files=extra_files)


def make_masks(kernels: dict, share: float | None, pattern: str,
               scope: str) -> tuple[dict[str, np.ndarray], float]:
  """(keep masks, the sparsity asked for) of ``pattern``; UserError on bad input."""
  if scope not in SCOPES:
    raise UserError(f'--scope={scope!r}: use one of {", ".join(SCOPES)}.')
  if scope == 'global' and pattern != 'unstructured':
    raise UserError(f'--scope=global ranks single weights across kernels: it goes with '
                    f'--pattern=unstructured, not {pattern}.')
  n_m = parse_n_m(pattern)
  if n_m is not None:
    implied = 1 - n_m[0] / n_m[1]
    if share is not None and not math.isclose(share, implied):
      raise UserError(f'--pattern={pattern} removes {implied:g} of the weights; leave '
                      f'--sparsity out or set it to {implied:g}.')
    return n_m_masks(kernels, *n_m), implied
  if pattern not in ('unstructured', 'rows'):
    raise UserError(f'--pattern={pattern!r} is not one of {", ".join(MASK_PATTERNS)}, '
                    'mlp_units or heads (python -m llm_jax.prune --help).')
  check_sparsity(share, pattern)
  if pattern == 'rows':
    return row_masks(kernels, share), share
  return unstructured_masks(kernels, share, scope), share


def prune(workdir: str, out: str, *, sparsity_share: float | None, pattern: str,
          scope: str = 'layer', targets: str = '', step: int | None = None) -> dict:
  """Prunes a run by magnitude into the new run ``out``; returns a summary.

  Args:
    workdir: the run to prune (its newest checkpoint, or ``step``).
    out: the run directory to create (must not exist, or be empty).
    sparsity_share: the share of the selected weights to remove, in [0, 1)
      (implied by an N:M pattern).
    pattern: 'unstructured', 'N:M' (e.g. '2:4') or 'rows'.
    scope: 'layer' (each kernel loses the same share) or 'global' (one
      magnitude threshold over all selected kernels; unstructured only).
    targets: which kernels (see ``selected_kernels``); '' all prunable ones.

  Returns:
    ``{'out', 'pattern', 'scope', 'sparsity', 'kernels'}`` and the
    ``sparsity.count`` of the pruned parameters.
  """
  if os.path.exists(out) and os.listdir(out):
    raise UserError(f'--out={out} already exists and is not empty; choose a new '
                    'directory for the pruned run.')
  make_masks({}, sparsity_share, pattern, scope)  # Bad flags fail before the load.
  run = workdir_lib.load(workdir, step)
  params = plain_params(run)
  kernels = selected_kernels(params, targets)
  masks, share = make_masks(kernels, sparsity_share, pattern, scope)
  flat = checkpoint.flatten_params(params)
  for name, keep in masks.items():
    flat[name] = np.where(keep, flat[name], np.float32(0))
  pruned = checkpoint.unflatten_like(flat, params)
  config = derived_config(run, out)
  config.prune.keep_zeros = True
  summary = {'pattern': pattern, 'scope': scope, 'sparsity': share,
             'kernels': len(masks), 'targets': targets or 'all'}
  mask_bytes = safetensors_save({k: np.ascontiguousarray(v) for k, v in masks.items()},
                                metadata={k: str(v) for k, v in summary.items()})
  source = dict(pruned_from=run.workdir, step=run.step, **summary)
  path = write_run(run, out, config, pruned, source, {MASK_FILE: mask_bytes})
  return {'out': path, **summary, **sparsity.count(pruned)}
