"""Masked-language-model batches for the encoder family (BERT/RoBERTa rule).

Each batch picks 15% of its ordinary (non-special) tokens; of those, 80%
become ``<mask>``, 10% a random ordinary token and 10% stay as they are. The
loss counts only the picked positions (the batch's ``weights``). Masking is
dynamic (new for every step, as in RoBERTa) yet a pure function of
``(seed, step)``: the random numbers are drawn for the whole global batch
from a generator seeded with both, and each host keeps its own rows, so a
resumed run and a multi-host run mask exactly as an uninterrupted one-host
run would. Validation batches use a fixed stream per batch index, so every
eval pass scores the same positions.
"""

import dataclasses
from collections.abc import Iterator

import numpy as np

from llm_jax.core.errors import UserError
from llm_jax.data import batch as batch_lib

MASK_RATE = 0.15  # Share of ordinary tokens the loss is computed on.
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # Of those: <mask>, random; rest kept.
# Stream ids mixed into the seed, so masking never reuses the random numbers
# of parameter init or data order, and train and eval never share a stream.
_TRAIN_STREAM, _EVAL_STREAM = 0x4D4C4D, 0x4D4C4E


@dataclasses.dataclass(frozen=True)
class Masker:
  """Turns ``{'inputs', 'targets'}`` windows into masked-LM batches."""
  vocab_size: int
  mask_id: int
  special_ids: tuple[int, ...]  # Never picked, never drawn as a random token.
  seed: int
  global_batch: int
  process_index: int = 0
  process_count: int = 1

  @classmethod
  def from_tokenizer(cls, tokenizer, *, seed: int, global_batch: int,
                     process_index: int = 0, process_count: int = 1) -> 'Masker':
    """A masker for ``tokenizer``, which must have a ``<mask>`` piece."""
    mask_id = tokenizer.mask_id
    if mask_id < 0:
      raise UserError(
          f'The tokenizer {tokenizer.path} has no mask token (<mask>, [MASK]), '
          "which model.kind='encoder' needs. Leave tokenizer.path empty so one "
          'is trained with it, or pass a tokenizer that has one.')
    special = sorted({tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id,
                      tokenizer.eos_id, mask_id, *tokenizer.special_ids} - {-1})
    return cls(vocab_size=tokenizer.vocab_size, mask_id=mask_id,
               special_ids=tuple(special), seed=seed, global_batch=global_batch,
               process_index=process_index, process_count=process_count)

  def _rows(self) -> slice:
    per_host = self.global_batch // self.process_count
    return slice(self.process_index * per_host, (self.process_index + 1) * per_host)

  def mask(self, tokens_BT: np.ndarray, step: int, *, stream: int = _TRAIN_STREAM) -> dict:
    """The masked-LM batch for this host's rows ``tokens_BT`` at ``step``.

    Returns:
      ``inputs`` (tokens with the picked ones replaced), ``targets`` (the
      original tokens) and ``weights`` (float32, 1 at picked positions).
    """
    tokens_BT = np.asarray(tokens_BT, np.int32)
    rows = self._rows()
    if tokens_BT.shape[0] != rows.stop - rows.start:
      raise ValueError(f'expected {rows.stop - rows.start} rows, got {tokens_BT.shape[0]}')
    shape = (self.global_batch, tokens_BT.shape[1])
    rng = np.random.default_rng([self.seed, stream, step])
    # Drawn for the whole global batch, then sliced: the same numbers on
    # every host layout.
    pick_BT = rng.random(shape)[rows]
    action_BT = rng.random(shape)[rows]
    ordinary = np.setdiff1d(np.arange(self.vocab_size), self.special_ids)
    random_BT = ordinary[rng.integers(0, ordinary.size, shape)][rows]
    picked_BT = (pick_BT < MASK_RATE) & ~np.isin(tokens_BT, self.special_ids)
    inputs_BT = np.where(picked_BT & (action_BT < MASK_SHARE), self.mask_id, tokens_BT)
    to_random = picked_BT & (action_BT >= MASK_SHARE) & (
        action_BT < MASK_SHARE + RANDOM_SHARE)
    inputs_BT = np.where(to_random, random_BT, inputs_BT)
    return batch_lib.check({'inputs': inputs_BT.astype(np.int32),
                            'targets': tokens_BT.astype(np.int32),
                            'weights': picked_BT.astype(np.float32)}, 'masked-LM batch')

  def train_batches(self, batches: Iterator[dict], start_step: int) -> Iterator[dict]:
    """Masks the pipeline's batches for steps ``start_step, start_step + 1, ...``."""
    for step, batch in enumerate(batches, start=start_step):
      yield self.mask(batch['inputs'], step)

  def eval_batches(self, batches: list[dict]) -> list[dict]:
    """Masks the fixed validation batches, the same way on every pass."""
    return [self.mask(b['inputs'], k, stream=_EVAL_STREAM) for k, b in enumerate(batches)]
