"""Instruction-tuning data: chat JSONL -> templated tokens -> packed, weighted rows.

Each JSONL line is ``{"prompt": ..., "response": ...}`` or ``{"messages":
[{"role": ..., "content": ...}, ...]}`` (a prompt/response pair is a user
then an assistant message). Every message is rendered with
``config.sft.template`` (``{role}`` and ``{content}`` filled in) and the
end-of-text token follows the last one. The loss weight of a target token is 1
inside an assistant message's content (and the template text after it, so
the model learns to close its turn) and on the final end-of-text; it is 0 on
everything else, prompts and role headers included.

With ``sft.pack`` several examples share a row of ``data.seq_len`` tokens;
``segment_ids`` (1, 2, ... per row, 0 on padding) keep them from attending to
one another and ``positions`` restart at 0 for each, so an example computes
exactly what it would alone. Rows are addressed by index like the token
windows of pre-training (``pipeline.batch_indices``): the batch at a step is
a pure function of ``(seed, step)`` and resume is exact.
"""

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterator

import numpy as np

from llm_jax.data import batch as batch_lib
from llm_jax.data import clean, pipeline, sources
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.core.errors import UserError

Log = Callable[[str], None]
# Packed rows carry every key of the language-model objective.
KEYS = ('inputs', 'targets', 'weights', 'positions', 'segment_ids')
ASSISTANT = 'assistant'


def read_examples(paths: str) -> list[list[dict]]:
  """Every example of the JSONL globs, as a list of messages."""
  files = sources.expand_globs(paths, 'sft')
  examples = []
  for path in files:
    with open(path, encoding='utf-8') as f:
      for n, line in enumerate(f, 1):
        if line.strip():
          examples.append(_messages(line, f'{path}:{n}'))
  if not examples:
    raise UserError(f'data.paths={paths!r} holds no examples; give JSONL files '
                    'of {"prompt", "response"} or {"messages": [...]} lines.')
  return examples


def with_responses(examples: list[list[dict]], paths: str, log: Log) -> list[list[dict]]:
  """The examples that have something to learn: a non-blank assistant message.

  An empty response still carries loss weight (the turn's closing template
  text and end-of-text), so it would teach the model to answer nothing;
  such examples are counted, named in a warning and left out.

  Raises:
    UserError: every example's response is empty.
  """
  kept = [e for e in examples
          if any(m['role'] == ASSISTANT and m['content'].strip() for m in e)]
  empty = len(examples) - len(kept)
  if not kept:
    raise UserError(
        f'All {len(examples)} examples in data.paths={paths!r} have an empty '
        'response: there is nothing to learn. Fill in their "response" (or the '
        'assistant messages\' "content") fields.')
  if empty:
    log(f'Warning: {empty} of {len(examples)} examples ({100 * empty / len(examples):.0f}%) '
        f'in data.paths={paths!r} have an empty response and are left out (they '
        'would teach the model to answer nothing).')
  return kept


def _messages(line: str, where: str) -> list[dict]:
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise UserError(f'{where} is not valid JSON ({e.msg}).') from None
  if isinstance(obj, dict) and 'messages' in obj:
    messages = obj['messages']
    ok = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get('role'), str)
        and isinstance(m.get('content'), str) for m in messages)
    if ok and any(m['role'] == ASSISTANT for m in messages):
      return [{'role': m['role'], 'content': m['content']} for m in messages]
  elif (isinstance(obj, dict) and isinstance(obj.get('prompt'), str)
        and isinstance(obj.get('response'), str)):
    return [{'role': 'user', 'content': obj['prompt']},
            {'role': ASSISTANT, 'content': obj['response']}]
  raise UserError(f'{where}: expected {{"prompt": str, "response": str}} or '
                  '{"messages": [{"role": str, "content": str}, ...]} with at '
                  'least one assistant message.')


def render(messages: list[dict], template: str,
           tokenizer: tokenizer_lib.Tokenizer, *,
           learn_from: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Token ids of a conversation and the loss weight of each id as a target.

  Messages before index ``learn_from`` carry no weight even if they are the
  assistant's (a preference pair's shared prompt, llm_jax/data/preference.py).
  """
  if template.count('{content}') != 1:
    raise UserError(f'sft.template={template!r} must contain {{content}} once.')
  ids, weights = [], []
  for i, m in enumerate(messages):
    head, tail = template.replace('{role}', m['role']).split('{content}')
    learn = float(m['role'] == ASSISTANT and i >= learn_from)
    for text, w in ((head, 0.0), (m['content'] + tail, learn)):
      piece = tokenizer.encode(text) if text else []
      ids += piece
      weights += [w] * len(piece)
  ids.append(tokenizer.eos_id)
  weights.append(1.0)
  return np.asarray(ids, np.int32), np.asarray(weights, np.float32)


def pack(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, *,
         packed: bool = True, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Rows ``[R, seq_len]`` of inputs/targets/weights/positions/segment_ids.

  An example of ``n`` tokens gives ``n - 1`` (input, target) pairs; one
  longer than a row keeps its first ``seq_len + 1`` tokens. Examples go into
  rows in order, a new row when the next one does not fit (or always, when
  not ``packed``).
  """
  rows, current, used = [], [], 0
  for ids, weights in examples:
    ids, weights = ids[:seq_len + 1], weights[:seq_len + 1]
    n = len(ids) - 1
    if n < 1 or not weights[1:].any():
      continue  # Nothing to learn from (e.g. the response was truncated away).
    if current and (not packed or used + n > seq_len):
      rows.append(current)
      current, used = [], 0
    current.append((ids, weights))
    used += n
  if current:
    rows.append(current)
  out = {k: np.zeros((len(rows), seq_len), np.int32) for k in KEYS}
  out['inputs'][:] = pad_id
  out['weights'] = np.zeros((len(rows), seq_len), np.float32)
  for r, row in enumerate(rows):
    start = 0
    for seg, (ids, weights) in enumerate(row, 1):
      n = len(ids) - 1
      span = slice(start, start + n)
      out['inputs'][r, span] = ids[:-1]
      out['targets'][r, span] = ids[1:]
      out['weights'][r, span] = weights[1:]
      out['positions'][r, span] = np.arange(n)
      out['segment_ids'][r, span] = seg
      start += n
  return batch_lib.check(out, 'SFT rows')


@dataclasses.dataclass(frozen=True)
class SftData:
  """Packed rows for training and validation, and what checkpoints record."""
  tokenizer: tokenizer_lib.Tokenizer
  train_rows: dict
  val_rows: dict
  manifest: dict
  vocab_floor: int = 0  # As shards.PreparedData's: a source model's padded vocabulary.

  @property
  def vocab_size(self) -> int:
    return max(self.tokenizer.vocab_size, self.vocab_floor)

  @property
  def num_windows(self) -> int:
    """Training rows per epoch (the name the training log uses)."""
    return len(self.train_rows['inputs'])

  @property
  def unigram_entropy(self) -> float:
    """Entropy (nats/token) of the weighted (response) training targets."""
    counts = np.bincount(self.train_rows['targets'].reshape(-1),
                         weights=self.train_rows['weights'].reshape(-1),
                         minlength=self.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())

  def train_batches(self, *, global_batch: int, seed: int, start_step: int,
                    process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """Endless batches for steps ``start_step, ...``: this host's rows."""
    step = start_step
    while True:
      idx = pipeline.batch_indices(step, global_batch=global_batch,
                                   num_windows=self.num_windows, seed=seed,
                                   process_index=process_index,
                                   process_count=process_count)
      yield {k: v[idx] for k, v in self.train_rows.items()}
      step += 1

  def eval_batches(self, *, global_batch: int, num_batches: int,
                   process_index: int = 0, process_count: int = 1) -> list[dict]:
    """Fixed validation batches: every row once (wrapping round to fill)."""
    num_rows = len(self.val_rows['inputs'])
    per_host = global_batch // process_count
    lo = process_index * per_host
    num_batches = min(num_batches, -(-num_rows // global_batch))
    batches = []
    for k in range(num_batches):
      positions = k * global_batch + lo + np.arange(per_host)
      idx = positions % num_rows
      batch = {key: v[idx] for key, v in self.val_rows.items()}
      # Rows repeated only to fill the last batch count nothing.
      batch['weights'] = batch['weights'] * (positions < num_rows)[:, None]
      batches.append(batch)
    return batches


def prepare(config, log: Log = logging.info) -> SftData:
  """Reads, renders, splits and packs ``data.paths`` for instruction tuning.

  The tokenizer is ``tokenizer.path`` (with ``init_from``, the source run's).
  """
  if not config.tokenizer.path:
    raise UserError("data.source='sft' needs a tokenizer: set init_from (its "
                    'tokenizer.model is used) or --config.tokenizer.path.')
  tokenizer = tokenizer_lib.load(config.tokenizer.path)
  examples = with_responses(read_examples(config.data.paths), config.data.paths, log)
  keyed = {json.dumps(e, sort_keys=True, ensure_ascii=False): e for e in examples}
  train_keys, val_keys = clean.split_by_hash(list(keyed), config.data.val_fraction)
  if not val_keys:
    raise UserError(f'No validation example among {len(keyed)}: raise '
                    '--config.data.val_fraction or add examples.')
  seq_len, template = config.data.seq_len, config.sft.template
  splits = {}
  for name, keys in (('train', train_keys), ('val', val_keys)):
    rendered = [render(keyed[k], template, tokenizer) for k in keys]
    cut = sum(len(ids) > seq_len + 1 for ids, _ in rendered)
    if cut:
      log(f'Warning: {cut} {name} examples are longer than data.seq_len={seq_len} '
          '+ 1 tokens; their ends are cut (raise data.seq_len to keep them).')
    splits[name] = pack(rendered, seq_len, packed=config.sft.pack,
                        pad_id=max(tokenizer.pad_id, 0))
    rows = splits[name]
    log(f'SFT {name}: {len(keys)} examples in {len(rows["inputs"])} rows of '
        f'{seq_len} tokens ({int((rows["segment_ids"] > 0).sum()):,} tokens, '
        f'{int(rows["weights"].sum()):,} with loss weight)')
  if not len(splits['train']['inputs']) or not len(splits['val']['inputs']):
    raise UserError('No example has a response token within data.seq_len='
                    f'{seq_len}; raise it.')
  content = hashlib.sha256(json.dumps(
      [sorted(keyed), template, seq_len, config.sft.pack]).encode()).hexdigest()
  manifest = {'content_sha256': content, 'examples': len(keyed),
              'tokenizer_sha256': tokenizer.sha256}
  return SftData(tokenizer=tokenizer, train_rows=splits['train'],
                 val_rows=splits['val'], manifest=manifest)
