"""Language-modelling metrics of a trained run: loss, perplexity, bits per byte.

On the run's own validation split (through the same windows the training loop
evaluates), on another source (``source``, ``paths``) or on text files. Bits
per byte divide the summed loss by the UTF-8 bytes of the raw text, not by
tokens, so runs with different vocabularies compare. An encoder run reports
its masked-token loss and accuracy instead. Results go to
``<workdir>/eval/<name>.json``.
"""

import functools
import glob
import json
import math
import os

import jax
import ml_collections
import numpy as np

from llm_jax.core import files
from llm_jax.core.errors import UserError
from llm_jax.data import masking, pipeline, shards
from llm_jax.runs import workdir as workdir_lib
from llm_jax.training import sparsity, steps

EVAL_DIR = 'eval'
LN2 = math.log(2)


def _eval_fn(run):
  """The training loop's eval step, jitted for the run's graph, one device."""
  return jax.jit(functools.partial(steps.eval_step, graphdef=run.graphdef))


def _sum_batches(run, batches) -> dict:
  """Summed loss, weight and correct argmaxes over ``batches``."""
  fn = _eval_fn(run)
  totals = {'loss_sum': 0.0, 'count': 0.0, 'correct': 0.0}
  for batch in batches:
    out = fn(run.params, batch)
    for k in totals:
      totals[k] += float(out[k])
  return totals


def _windows_batches(windows, indices: np.ndarray, batch_size: int):
  """Batches of whole windows at ``indices``; the last one may be short."""
  for lo in range(0, len(indices), batch_size):
    yield pipeline.split_windows(windows.gather(indices[lo:lo + batch_size]))


def _lm_metrics(run, totals: dict, tokens: int, text_bytes: int) -> dict:
  """Loss, perplexity and bits per byte (decoder) or masked accuracy (encoder)."""
  loss = totals['loss_sum'] / max(totals['count'], 1.0)
  out = {'loss': loss, 'tokens_scored': int(totals['count'])}
  if not run.model_cfg.causal:
    out['masked_accuracy'] = totals['correct'] / max(totals['count'], 1.0)
    return out
  out['perplexity'] = float(np.exp(min(loss, 50)))
  out['next_token_accuracy'] = totals['correct'] / max(totals['count'], 1.0)
  # Nats per token x tokens per byte of the raw UTF-8 text, in bits: the
  # tokenizer cancels out. The text's tokens include one end-of-text per
  # document, whose prediction is part of the cost of the text.
  out['bits_per_byte'] = loss * tokens / text_bytes / LN2
  out['text_bytes'], out['text_tokens'] = text_bytes, tokens
  return out


def evaluate_split(run, *, split: str = 'val', source: str = '', paths: str = '',
                   num_batches: int | None = None, batch_size: int | None = None,
                   log=print) -> dict:
  """Metrics on a split of the run's data (or of another configured source).

  Args:
    run: a ``workdir.Run``.
    split: 'val' or 'train'.
    source, paths: override ``data.source`` / ``data.paths`` (same split
      rule: documents go to validation by content hash).
    num_batches: validation batches (default ``train.eval_batches``, the
      windows the training loop evaluates); 0 scores every window.
    batch_size: rows per batch (default ``train.batch_size``).
    log: receives progress lines.

  Returns:
    The metrics dict (see ``_lm_metrics``) with where they came from.
  """
  if split not in ('val', 'train'):
    raise UserError(f"--split={split!r}: use 'val' or 'train'.")
  workdir_lib.require_tokenizer(run)
  config = ml_collections.ConfigDict(run.config.to_dict())
  if source:
    config.data.source, config.data.paths = source, paths
    config.data.max_documents = 0
  # The run's own tokenizer: never retrain, whatever the cache holds.
  config.tokenizer.path = workdir_lib.tokenizer_path(run.workdir)
  data = shards.prepare(config, log=log)
  if data.tokenizer.sha256 != run.meta.get('tokenizer_sha256', data.tokenizer.sha256):
    raise UserError(f'The tokenizer in {run.workdir} is not the one its checkpoint '
                    'was trained with; restore its tokenizer files from the run.')
  windows = pipeline.TokenWindows(
      data.train_shards if split == 'train' else data.val_shards,
      data.manifest['dtype'], config.data.seq_len)
  num_batches = config.train.eval_batches if num_batches is None else num_batches
  global_batch = config.train.batch_size
  if not run.model_cfg.causal or (num_batches and not batch_size):
    # The training loop's own batches (and, for an encoder, its masks).
    batches = pipeline.eval_batches(windows, global_batch=global_batch,
                                    num_batches=num_batches or -(-windows.num_windows // global_batch))
    if not run.model_cfg.causal:
      batches = masking.Masker.from_tokenizer(
          data.tokenizer, seed=config.seed, global_batch=global_batch).eval_batches(batches)
  elif num_batches:
    total = num_batches * global_batch
    chosen = (np.arange(total) % windows.num_windows if total >= windows.num_windows
              else (np.arange(total) * windows.num_windows) // total)
    batches = _windows_batches(windows, chosen, batch_size)
  else:
    batches = _windows_batches(windows, np.arange(windows.num_windows),
                               batch_size or global_batch)
  entry = data.manifest['splits'][split]
  out = _lm_metrics(run, _sum_batches(run, batches), entry['tokens'], entry['text_bytes'])
  return {'data': f'{config.data.source} {split} split', **out}


def evaluate_files(run, pattern: str, *, batch_size: int | None = None) -> dict:
  """Metrics on text files, each one document, every window scored."""
  if not run.model_cfg.causal:
    raise UserError('--file scores next-token prediction; for an encoder run use '
                    'the validation split (no --file) or --source/--paths.')
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
  if not paths:
    raise UserError(f'--file={pattern!r} matches no file; pass a glob such as data/*.txt.')
  tok = workdir_lib.require_tokenizer(run)
  tokens, text_bytes = [], 0
  for path in paths:
    with open(path, encoding='utf-8', errors='replace') as f:
      text = f.read()
    text_bytes += len(text.encode('utf-8'))
    tokens.extend(tok.encode(text) + [tok.eos_id])
  tokens = np.asarray(tokens, np.int32)
  seq_len = run.config.data.seq_len
  num_windows = (tokens.size - 1) // seq_len
  if num_windows < 1:
    raise UserError(f'--file={pattern!r} holds {tokens.size} tokens, fewer than one '
                    f'window of data.seq_len={seq_len} + 1; pass more text.')
  rows = np.arange(num_windows)[:, None] * seq_len + np.arange(seq_len + 1)
  windows = tokens[rows]
  step = batch_size or run.config.train.batch_size
  batches = ({'inputs': windows[lo:lo + step, :-1], 'targets': windows[lo:lo + step, 1:]}
             for lo in range(0, num_windows, step))
  out = _lm_metrics(run, _sum_batches(run, batches), int(tokens.size), text_bytes)
  return {'data': f'{len(paths)} file(s) {pattern}', **out}


def model_size(run) -> dict:
  """Parameter counts, sparsity of the block kernels and stored sizes of a run.

  See ``training.sparsity.count``: ``params``, ``params_nonzero``,
  ``sparsity`` (zeros among the prunable block kernels: 0 for a dense run),
  ``float32_bytes`` and ``sparse_bytes``; plus ``mlp_dim`` (smaller after
  structured pruning).
  """
  return {**sparsity.count(run.params), 'mlp_dim': run.model_cfg.mlp_dim}


def write_json(workdir: str, name: str, results: dict) -> str:
  """Writes ``<workdir>/eval/<name>.json`` whole or not at all."""
  directory = os.path.join(workdir, EVAL_DIR)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f'{name}.json')
  return files.atomic_write(path, json.dumps(results, indent=2, sort_keys=True) + '\n')


def markdown_table(results: dict) -> str:
  """A two-column Markdown table of the scalar results."""
  lines = ['| metric | value |', '| --- | --- |']
  for key, value in results.items():
    if isinstance(value, float):
      value = f'{value:.4f}' if abs(value) < 1e5 else f'{value:.4g}'
    elif not isinstance(value, (int, str)):
      continue
    lines.append(f'| {key} | {value} |')
  return '\n'.join(lines)
