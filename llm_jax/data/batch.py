"""The batch contract: what the data side produces and the train/eval steps consume.

A batch is a dict of ``[B, T]`` arrays (``B`` rows of ``T = data.seq_len``
positions). Every producer (``pipeline.make_batch`` for token windows,
``masking.Masker`` for masked-LM, ``sft.pack`` for instruction tuning,
``tasks`` for an encoder's task head) returns one, and
``llm_jax/training/objectives.py`` reads one. A new objective adds its keys
here, with a comment, and ``check`` learns them. A value that belongs to a
row, not a position (a class label, an answer's start), is repeated along T:
it then shards, and splits into micro-batches, like every other key.

===============  =======  ========  ===============================================
key              dtype    required  meaning
===============  =======  ========  ===============================================
inputs           int32    yes       token ids the model reads
targets          int32    LM        the id to predict at each position (the next
                                    token; for a masked LM the original token)
labels           int32    cls       a classification row's label id (per row)
start_positions  int32    qa        the row's answer start token, 0 ([CLS]) for
                                    "no answer in this window" (per row)
end_positions    int32    qa        the row's answer end token (inclusive; per row)
token_type_ids   int32    no        which text of a pair a token belongs to (0
                                    or 1: BERT's segment embedding); absent: 0
weights          float32  no        loss weight per target (1 counts, 0 ignores:
                                    SFT prompts and padding, unmasked MLM tokens;
                                    per row for a task head: 0 for fill rows);
                                    absent means every target counts
positions        int32    no        position of each token within its own
                                    sequence (packed rows restart at 0); absent
                                    means 0..T-1 in every row
segment_ids      int32    no        which packed sequence a token belongs to
                                    (padding 0); tokens attend only within their
                                    segment; absent means one sequence per row
===============  =======  ========  ===============================================

Exactly one objective's keys are present: ``targets`` (language models),
``labels`` (classification) or ``start_positions`` and ``end_positions`` (QA).

Preference pairs (reward model, DPO, ORPO; ``llm_jax/data/preference.py``):
``inputs``/``targets``/``weights`` hold the *chosen* conversation, and three
more keys the *rejected* one of the same pair, row for row. Rows are padded
on the right, one pair per row (no packing), so positions are 0..T-1 and
``weights`` (1 on response targets, end-of-text included) also say where a
response ends: its last weighted position is where a reward is read. A pair
whose chosen weights are all 0 is filler (the end of an eval set) and counts
nothing.

=================  =======  ========  =============================================
key                dtype    required  meaning
=================  =======  ========  =============================================
rejected_inputs    int32    pairs     token ids of the rejected conversation
rejected_targets   int32    pairs     its next tokens
rejected_weights   float32  pairs     1 on its response targets, 0 elsewhere
=================  =======  ========  =============================================

GRPO rollouts (``llm_jax/inference/rollouts.py``): a row is a prompt and one
sampled completion; ``weights`` mark the completion's targets. Per-sequence
values are broadcast over the row so every key stays ``[B, T]``.

=================  =======  ========  =============================================
key                dtype    required  meaning
=================  =======  ========  =============================================
advantages         float32  rollouts  the completion's group-normalised advantage
rewards            float32  rollouts  its raw reward (for the logged mean)
=================  =======  ========  =============================================
"""

from typing import NotRequired, Required, TypedDict

import numpy as np

from llm_jax.core.errors import UserError


class Batch(TypedDict, total=False):
  """One batch (host-local numpy arrays, or global ``jax.Array``s on a mesh)."""
  inputs: Required[np.ndarray]
  targets: NotRequired[np.ndarray]
  labels: NotRequired[np.ndarray]
  start_positions: NotRequired[np.ndarray]
  end_positions: NotRequired[np.ndarray]
  token_type_ids: NotRequired[np.ndarray]
  weights: NotRequired[np.ndarray]
  positions: NotRequired[np.ndarray]
  segment_ids: NotRequired[np.ndarray]
  rejected_inputs: NotRequired[np.ndarray]
  rejected_targets: NotRequired[np.ndarray]
  rejected_weights: NotRequired[np.ndarray]
  advantages: NotRequired[np.ndarray]
  rewards: NotRequired[np.ndarray]


REQUIRED = ('inputs',)
# What each objective predicts: one of these key sets is present.
OBJECTIVE_KEYS = (('targets',), ('labels',), ('start_positions', 'end_positions'))
OPTIONAL = ('targets', 'labels', 'start_positions', 'end_positions', 'token_type_ids',
            'weights', 'positions', 'segment_ids')
# Keys that come together or not at all: a preference pair's rejected side,
# and a rollout's per-sequence values.
PAIR = ('rejected_inputs', 'rejected_targets', 'rejected_weights')
ROLLOUT = ('advantages', 'rewards')
DTYPES = {'inputs': np.int32, 'targets': np.int32, 'weights': np.float32,
          'positions': np.int32, 'segment_ids': np.int32, 'labels': np.int32,
          'start_positions': np.int32, 'end_positions': np.int32,
          'token_type_ids': np.int32,
          'rejected_inputs': np.int32, 'rejected_targets': np.int32,
          'rejected_weights': np.float32, 'advantages': np.float32,
          'rewards': np.float32}


def check(batch: Batch, where: str = 'batch') -> Batch:
  """Returns ``batch`` if it keeps the contract; UserError naming the misfit.

  Producers call this where batches leave the data side, so a reader written
  by a user (or a new objective) fails here, by key, not deep inside XLA.
  """
  missing = [k for k in REQUIRED if k not in batch]
  goals = [keys for keys in OBJECTIVE_KEYS if any(k in batch for k in keys)]
  if len(goals) != 1 or any(k not in batch for k in goals[0]):
    missing.append(' or '.join('+'.join(keys) for keys in OBJECTIVE_KEYS))
  for group in (PAIR, ROLLOUT):  # All of a group, or none of it.
    if any(k in batch for k in group):
      missing += [k for k in group if k not in batch]
  unknown = sorted(set(batch) - set(DTYPES))
  if missing or unknown:
    raise UserError(f'{where}: the batch has keys {sorted(batch)}; it needs '
                    f'{list(REQUIRED)}, one objective\'s keys '
                    f'({" | ".join("+".join(k) for k in OBJECTIVE_KEYS)}) and may have '
                    f'{list(OPTIONAL)}, all of {list(PAIR)} or all of {list(ROLLOUT)} '
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
