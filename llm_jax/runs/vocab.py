"""Vocabulary extension: teach a run's tokenizer new text, grow its embeddings.

``extend_vocab_workdir`` trains SentencePiece pieces on new text, appends those
the tokenizer lacks (old ids unchanged), grows the embedding and output rows
(new rows start at the mean of the old ones) and writes a new workdir with the
merged tokenizer. Continue it with ``config.init_from``.
"""

import glob
import json
import os

import jax.numpy as jnp
import ml_collections

from llm_jax.core import files
from llm_jax.core.errors import UserError
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.model import lora
from llm_jax.runs import workdir as workdir_lib
from llm_jax.training import metrics
from llm_jax.training.checkpoint import flatten_params


def grow_vocab(params: dict, new_vocab_size: int) -> dict:
  """Appends embedding rows (and LM-head columns) at the mean of the old ones.

  Old rows and columns are untouched, so on old ids the model computes what
  it did; a new row starts where an average token is, not at random noise
  that would dominate the softmax.
  """
  params = dict(params)
  table = params['embed']['table']
  extra = new_vocab_size - table.shape[0]
  if extra < 0:
    raise UserError(f'Cannot shrink the vocabulary from {table.shape[0]} to '
                    f'{new_vocab_size}.')
  mean_row = jnp.mean(table, axis=0, keepdims=True)
  params['embed'] = dict(params['embed'], table=jnp.concatenate(
      [table, jnp.repeat(mean_row, extra, axis=0)], axis=0))
  if params.get('lm_head') is not None:
    kernel = params['lm_head']['kernel']
    mean_col = jnp.mean(kernel, axis=1, keepdims=True)
    params['lm_head'] = dict(params['lm_head'], kernel=jnp.concatenate(
        [kernel, jnp.repeat(mean_col, extra, axis=1)], axis=1))
  return params


def read_texts(pattern: str) -> list[str]:
  """The documents of comma-separated globs (text files, or JSONL 'text')."""
  files = sorted({f for p in pattern.split(',') if p
                  for f in glob.glob(os.path.expanduser(p), recursive=True)})
  if not files:
    raise UserError(f'--text={pattern!r} matches no file.')
  texts = []
  for path in files:
    with open(path, encoding='utf-8', errors='replace') as f:
      if path.endswith('.jsonl'):
        texts.extend(json.loads(line)['text'] for line in f if line.strip())
      else:
        texts.append(f.read())
  return texts


def extend_vocab_workdir(workdir: str, text: str, num_pieces: int | None,
                         out: str) -> str:
  """Writes ``out``: ``workdir``'s model with new pieces learnt from ``text``.

  Args:
    workdir: a run (or import) with a SentencePiece tokenizer.model.
    text: comma-separated globs of the new text.
    num_pieces: the most pieces to add.
    out: the new workdir (checkpoint at the source's step, fresh optimizer
      state, the merged tokenizer.model); continue it with init_from.

  Returns:
    The new workdir's absolute path.
  """
  # Before the (slow) tokenizer training: --out must not be or touch the run.
  files.check_replaceable(os.path.abspath(out), marker=None,
                          protect=(os.path.abspath(workdir),), what='run directory')
  run = workdir_lib.load(workdir)
  if run.tokenizer is None or run.tokenizer.kind != 'sentencepiece':
    has = 'no tokenizer' if run.tokenizer is None else f'a {run.tokenizer.file_name}'
    raise UserError(f'{workdir} has {has}: only a SentencePiece tokenizer.model can be '
                    'extended (a Hugging Face tokenizer cannot: train a new one instead).')
  merged, added = tokenizer_lib.extend_tokenizer(
      run.tokenizer.model_bytes, read_texts(text), num_pieces or 0,
      num_threads=run.config.data.num_threads)
  vocab_size = run.tokenizer.vocab_size + len(added)
  params = run.params
  if any('/lora_' in k for k in flatten_params(params)):
    params = lora.merge(params, run.config.lora)
  params = grow_vocab(params, vocab_size)
  config = ml_collections.ConfigDict(run.config.to_dict())
  config.tokenizer.vocab_size = vocab_size
  config.init_from = ''
  config.lora.rank = 0  # Adapters, if any, are merged into the weights.
  metrics.say(f'Added {len(added)} pieces ({run.tokenizer.vocab_size} -> '
              f'{vocab_size}), e.g. {" ".join(added[:10])}')
  return workdir_lib.write(
      out, config, params, vocab_size=vocab_size,
      tokenizer=tokenizer_lib.Tokenizer.from_bytes(merged),
      source=dict(extended_from=run.workdir, step=run.step, added_pieces=len(added)),
      protect=(run.workdir,))
