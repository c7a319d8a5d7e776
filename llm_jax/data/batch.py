"""The batch contract: what the data side produces and the train/eval steps consume.

A batch is a dict of ``[B, T]`` arrays (``B`` rows of ``T = data.seq_len``
positions). Every producer (``pipeline.make_batch`` for token windows,
``masking.Masker`` for masked-LM, ``sft.pack`` for instruction tuning) returns
one, and ``llm_jax/training/objectives.py`` reads one. A new objective adds
its keys here, with a comment, and ``check`` learns them.

=============  =======  ========  =================================================
key            dtype    required  meaning
=============  =======  ========  =================================================
inputs         int32    yes       token ids the model reads
targets        int32    yes       the id to predict at each position (the next
                                  token; for a masked LM the original token)
weights        float32  no        loss weight per target (1 counts, 0 ignores:
                                  SFT prompts and padding, unmasked MLM tokens);
                                  absent means every target counts
positions      int32    no        position of each token within its own
                                  sequence (packed rows restart at 0); absent
                                  means 0..T-1 in every row
segment_ids    int32    no        which packed sequence a token belongs to
                                  (padding 0); tokens attend only within their
                                  segment; absent means one sequence per row
=============  =======  ========  =================================================
"""

from typing import NotRequired, Required, TypedDict

import numpy as np

from llm_jax.core.errors import UserError


class Batch(TypedDict, total=False):
  """One batch (host-local numpy arrays, or global ``jax.Array``s on a mesh)."""
  inputs: Required[np.ndarray]
  targets: Required[np.ndarray]
  weights: NotRequired[np.ndarray]
  positions: NotRequired[np.ndarray]
  segment_ids: NotRequired[np.ndarray]


REQUIRED = ('inputs', 'targets')
OPTIONAL = ('weights', 'positions', 'segment_ids')
DTYPES = {'inputs': np.int32, 'targets': np.int32, 'weights': np.float32,
          'positions': np.int32, 'segment_ids': np.int32}


def check(batch: Batch, where: str = 'batch') -> Batch:
  """Returns ``batch`` if it keeps the contract; UserError naming the misfit.

  Producers call this where batches leave the data side, so a reader written
  by a user (or a new objective) fails here, by key, not deep inside XLA.
  """
  missing = [k for k in REQUIRED if k not in batch]
  unknown = sorted(set(batch) - set(REQUIRED) - set(OPTIONAL))
  if missing or unknown:
    raise UserError(f'{where}: the batch has keys {sorted(batch)}; it needs '
                    f'{list(REQUIRED)} and may have {list(OPTIONAL)} '
                    f'(missing {missing}, unknown {unknown}).')
  shape = np.shape(batch['inputs'])
  for key, value in batch.items():
    if len(np.shape(value)) != 2 or np.shape(value) != shape:
      raise UserError(f'{where}: {key!r} has shape {list(np.shape(value))}; every '
                      f'key must be [batch, seq_len] = {list(shape)}.')
    if np.dtype(value.dtype) != np.dtype(DTYPES[key]):
      raise UserError(f'{where}: {key!r} is {np.dtype(value.dtype).name}; the '
                      f'contract says {np.dtype(DTYPES[key]).name}.')
  return batch
