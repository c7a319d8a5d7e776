"""Encoder task data: labelled texts (classification) and SQuAD (extractive QA) as rows.

Classification reads JSONL, one object per line: ``task.text_field`` (and
``task.text_pair_field`` for a pair) and ``task.label_field``. Labels are
``task.labels`` in id order, or the sorted labels of the training file; a
label outside the set stops the run with the file, line and label.

QA reads SQuAD v1.1 / v2.0 JSON, the official format: ``data[].paragraphs[]``
with a ``context`` and ``qas[]`` of ``id``, ``question``, ``answers[]``
(``text``, ``answer_start``: a character offset) and, in v2.0,
``is_impossible``. An answer whose text is not at its ``answer_start`` stops
the run, naming the question. A context longer than one window is cut into
windows ``task.doc_stride`` tokens apart (each with the question); a training
window without the answer, and an unanswerable question, point at the first
token ([CLS], <s>): "no answer". An answer that fits no window (longer than
a window's context part) cannot be learnt: such questions are skipped from
training, counted and named.

A row is the tokenizer's pair layout (``with_specials``: ``[CLS] question
[SEP] context [SEP]``, ``<s> q </s></s> c </s>``) padded to ``data.seq_len``.
Rows keep the batch contract (``batch.py``): every key is ``[rows, T]``, and a
row's own values (its label, its answer's start and end token, its weight)
are repeated along T so they shard and split into micro-batches like tokens.
"""

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator

import numpy as np

from llm_jax.core.errors import UserError
from llm_jax.data import batch as batch_lib
from llm_jax.data import clean, pipeline

Log = Callable[[str], None]
HEADS = ('classification', 'qa')


# ---- Reading.


@dataclasses.dataclass(frozen=True)
class Labelled:
  """One classification example; ``where`` is ``file:line`` for messages."""
  text: str
  pair: str | None
  label: str
  where: str


@dataclasses.dataclass(frozen=True)
class Question:
  """One SQuAD question; ``answers`` are ``(text, char start)`` pairs."""
  qid: str
  question: str
  context: str
  answers: tuple[tuple[str, int], ...]
  impossible: bool


def _open(path: str, what: str):
  try:
    return open(os.path.expanduser(path), encoding='utf-8')
  except OSError as e:
    raise UserError(f'Cannot read the {what} {path} ({e.strerror}); set task.train_path '
                    '/ task.val_path to an existing file.') from None


def read_labelled(path: str, task_cfg) -> list[Labelled]:
  """The JSONL examples of ``path`` (UserError names the file and line)."""
  fields = [task_cfg.text_field, task_cfg.label_field]
  if task_cfg.text_pair_field:
    fields.insert(1, task_cfg.text_pair_field)
  out = []
  with _open(path, 'classification file') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path}:{number}'
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f'{where} is not JSON ({e.msg}); write one object per line.') from None
      missing = [k for k in fields if not isinstance(obj, dict) or k not in obj]
      if missing:
        raise UserError(f'{where} has no field {missing[0]!r} (task.text_field, '
                        'task.text_pair_field and task.label_field name them).')
      pair = str(obj[task_cfg.text_pair_field]) if task_cfg.text_pair_field else None
      out.append(Labelled(str(obj[task_cfg.text_field]), pair,
                          str(obj[task_cfg.label_field]), where))
  if not out:
    raise UserError(f'The classification file {path} has no examples.')
  return out


def label_set(task_cfg, train: list[Labelled]) -> list[str]:
  """``task.labels`` in id order, else the training file's labels sorted."""
  labels = [s for s in task_cfg.labels.split(',') if s] or sorted({e.label for e in train})
  if len(labels) < 2:
    raise UserError(f'A classifier needs at least 2 labels; task.labels / the training '
                    f'file give {labels}.')
  return labels


def label_ids(examples: list[Labelled], labels: list[str]) -> np.ndarray:
  """Each example's label id; UserError for a label outside the set."""
  index = {name: i for i, name in enumerate(labels)}
  for e in examples:
    if e.label not in index:
      raise UserError(f'{e.where}: label {e.label!r} is not in the label set '
                      f'({",".join(labels)}); fix the line or add it to task.labels.')
  return np.asarray([index[e.label] for e in examples], np.int32)


def read_squad(path: str) -> tuple[list[Question], bool]:
  """The questions of a SQuAD JSON file and whether it is v2 (no-answer allowed)."""
  with _open(path, 'SQuAD file') as f:
    try:
      spec = json.load(f)
    except json.JSONDecodeError as e:
      raise UserError(f'{path} is not valid JSON ({e}).') from None
  if not isinstance(spec, dict) or not isinstance(spec.get('data'), list):
    raise UserError(f'{path} is not a SQuAD file: it needs {{"data": [{{"paragraphs": '
                    '[{"context", "qas"}]}]}.')
  questions, v2 = [], str(spec.get('version', '')).startswith('v2')
  for article in spec['data']:
    for para in article.get('paragraphs', []):
      context = para['context']
      for qa in para.get('qas', []):
        questions.append(_question(path, qa, context))
        v2 = v2 or questions[-1].impossible
  if not questions:
    raise UserError(f'The SQuAD file {path} has no questions.')
  return questions, v2


def _question(path: str, qa: dict, context: str) -> Question:
  qid = str(qa.get('id', '?'))
  answers = []
  for a in qa.get('answers', []):
    text, start = a.get('text', ''), a.get('answer_start', -1)
    if not isinstance(start, int) or context[start:start + len(text)] != text:
      found = context[start:start + len(text)] if isinstance(start, int) else ''
      raise UserError(f'{path}: question {qid!r}: answer {text!r} is not at '
                      f'answer_start={start} of its context (found {found!r}); fix '
                      'answer_start (a character offset into the context).')
    answers.append((text, start))
  impossible = bool(qa.get('is_impossible', False))
  if not answers and not impossible:
    raise UserError(f'{path}: question {qid!r} has no answers and is not marked '
                    'is_impossible (SQuAD v2); give an answer or mark it.')
  return Question(qid, qa['question'], context, tuple(answers), impossible)


# ---- Rows.


def _pad_rows(seqs: list[tuple[list, list]], seq_len: int, pad_id: int) -> dict:
  """inputs, token_type_ids and segment_ids (1: token, 0: padding) of rows."""
  n = len(seqs)
  out = {'inputs': np.full((n, seq_len), pad_id, np.int32),
         'token_type_ids': np.zeros((n, seq_len), np.int32),
         'segment_ids': np.zeros((n, seq_len), np.int32)}
  for r, (ids, types) in enumerate(seqs):
    out['inputs'][r, :len(ids)] = ids
    out['token_type_ids'][r, :len(ids)] = types
    out['segment_ids'][r, :len(ids)] = 1
  return out


def _per_row(values, seq_len: int, dtype) -> np.ndarray:
  """A row's own value repeated along T (the batch contract's [B, T])."""
  return np.repeat(np.asarray(values, dtype)[:, None], seq_len, axis=1)


def classification_rows(examples: list[Labelled], ids: np.ndarray, tok, seq_len: int,
                        log: Log) -> dict:
  """Rows of single texts or pairs, cut longest-first to fit ``seq_len``."""
  pair = examples[0].pair is not None
  room = seq_len - len(tok.with_specials([], [] if pair else None)[0])
  seqs, cut = [], 0
  for e in examples:
    a, b = tok.encode(e.text), tok.encode(e.pair) if pair else None
    cut += len(a) + len(b or []) > room
    a, b = _longest_first(a, b, room)
    full, types, _ = tok.with_specials(a, b)
    seqs.append((full, types))
  if cut:
    log(f'{cut} texts were longer than data.seq_len={seq_len} tokens and were cut.')
  rows = _pad_rows(seqs, seq_len, max(tok.pad_id, 0))
  rows['labels'] = _per_row(ids, seq_len, np.int32)
  rows['weights'] = _per_row(np.ones(len(examples)), seq_len, np.float32)
  return batch_lib.check(rows, 'classification rows')


def longest_first(la: int, lb: int, room: int) -> tuple[int, int]:
  """Lengths after cutting the longer text first, a token at a time, to fit ``room``.

  (The second text loses a token only when strictly longer.) The closed form
  is what the SavedModel's ``classify`` computes in the graph.
  """
  if la + lb <= room:
    return la, lb
  short = min(la, lb)
  if 2 * short <= room:  # The shorter text stays whole.
    return (la, room - la) if la == short else (room - lb, lb)
  return room // 2, room - room // 2


def _longest_first(a: list, b: list | None, room: int) -> tuple[list, list | None]:
  if b is None:
    return a[:room], None
  la, lb = longest_first(len(a), len(b), room)
  return a[:la], b[:lb]


@dataclasses.dataclass
class Windows:
  """QA rows and what maps them back to their questions' text."""
  rows: dict
  question_of: np.ndarray  # [N] index of each row's question.
  offsets: np.ndarray  # [N, T, 2] character span of each context token, else -1.


def qa_windows(questions: list[Question], tok, seq_len: int, task_cfg, *, train: bool,
               log: Log) -> Windows:
  """Windows of each question's context (doc stride), with answer positions.

  ``train``: skip (count and name) questions whose answer fits no window; for
  evaluation they stay, every window saying "no answer".
  """
  layout = tok.template(True)
  if not isinstance(layout[0][0], int):
    raise UserError('QA needs a tokenizer whose pair layout starts with a special token '
                    '([CLS], <s>, bos) for "no answer"; this one adds none.')
  room = seq_len - len(tok.with_specials([], [])[0])
  if task_cfg.doc_stride < 1:
    raise UserError(f'task.doc_stride={task_cfg.doc_stride} must be at least 1.')
  seqs, labels, question_of, offsets = [], [], [], []
  long_contexts, unfit = 0, []
  for qi, q in enumerate(questions):
    q_ids = tok.encode(q.question)[:task_cfg.max_query_len]
    c_ids, c_offs = tok.encode_with_offsets(q.context)
    budget = room - len(q_ids)
    if budget < 1:
      raise UserError(f'task.max_query_len={task_cfg.max_query_len} leaves no context in '
                      f'data.seq_len={seq_len} windows; lower it or raise data.seq_len.')
    starts = list(range(0, max(len(c_ids) - budget, 0) + 1, task_cfg.doc_stride))
    if starts[-1] + budget < len(c_ids):
      starts.append(len(c_ids) - budget)
    long_contexts += len(starts) > 1
    span = _token_span(q, c_offs) if q.answers else None
    if train and q.answers and (span is None or span[1] - span[0] + 1 > budget):
      unfit.append(q.qid)
      continue
    for s in starts:
      ids, types, seq_ids = tok.with_specials(q_ids, c_ids[s:s + budget])
      first = seq_ids.index(1) if 1 in seq_ids else len(ids)
      row_offsets = np.full((seq_len, 2), -1, np.int32)
      n = min(budget, len(c_ids) - s)
      row_offsets[first:first + n] = c_offs[s:s + n]
      inside = span is not None and s <= span[0] and span[1] < s + budget
      labels.append((first + span[0] - s, first + span[1] - s) if inside else (0, 0))
      seqs.append((ids, types))
      question_of.append(qi)
      offsets.append(row_offsets)
  if long_contexts:
    log(f'{long_contexts} contexts were longer than one window of data.seq_len={seq_len} '
        f'tokens and were cut into windows task.doc_stride={task_cfg.doc_stride} apart.')
  if unfit:
    log(f'Skipped {len(unfit)} training questions whose answer fits no window (raise '
        f'data.seq_len): {", ".join(unfit[:5])}{" ..." if len(unfit) > 5 else ""}')
  if not seqs:
    raise UserError('No QA example is left to train on (see the skipped questions above).')
  rows = _pad_rows(seqs, seq_len, max(tok.pad_id, 0))
  labels = np.asarray(labels, np.int32)
  rows.update(start_positions=_per_row(labels[:, 0], seq_len, np.int32),
              end_positions=_per_row(labels[:, 1], seq_len, np.int32),
              weights=_per_row(np.ones(len(seqs)), seq_len, np.float32))
  return Windows(batch_lib.check(rows, 'QA rows'), np.asarray(question_of, np.int32),
                 np.stack(offsets))


def _token_span(q: Question, offsets) -> tuple[int, int] | None:
  """First and last context token of the first answer, or None if none covers it."""
  text, start = q.answers[0]
  end = start + len(text.rstrip())
  start += len(text) - len(text.lstrip())
  tokens = [j for j, (a, b) in enumerate(offsets) if b > start and a < end]
  return (tokens[0], tokens[-1]) if tokens else None


# ---- The data a task run trains on.


@dataclasses.dataclass(frozen=True)
class TaskData:
  """Training and validation rows of a task, and what checkpoints record."""
  head: str
  tokenizer: object
  train_rows: dict
  val_rows: dict
  manifest: dict
  labels: tuple[str, ...] = ()  # Classification: names in id order.
  val_examples: tuple = ()  # Labelled or Question, as read.
  val_windows: Windows | None = None  # QA: what maps rows back to answers.
  v2: bool = False  # QA: questions may have no answer.
  vocab_floor: int = 0  # A source model's vocabulary (init_from) may be larger.

  @property
  def vocab_size(self) -> int:
    return max(self.tokenizer.vocab_size, self.vocab_floor)

  @property
  def num_windows(self) -> int:
    """Training rows per epoch (the name the training log uses)."""
    return len(self.train_rows['inputs'])

  @property
  def unigram_entropy(self) -> float:
    return 0.0  # Not a language model: the summary reports task baselines.

  def train_batches(self, *, global_batch: int, seed: int, start_step: int,
                    process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """Endless batches for steps ``start_step, ...``: a pure function of (seed, step)."""
    step = start_step
    while True:
      idx = pipeline.batch_indices(step, global_batch=global_batch,
                                   num_windows=self.num_windows, seed=seed,
                                   process_index=process_index, process_count=process_count)
      yield {k: v[idx] for k, v in self.train_rows.items()}
      step += 1

  def eval_batches(self, *, global_batch: int, num_batches: int,
                   process_index: int = 0, process_count: int = 1) -> list[dict]:
    """Fixed validation batches: every row once (wrapping round, weight 0, to fill)."""
    return row_batches(self.val_rows, global_batch=global_batch, num_batches=num_batches,
                       process_index=process_index, process_count=process_count)


def row_batches(rows: dict, *, global_batch: int, num_batches: int | None = None,
                process_index: int = 0, process_count: int = 1) -> list[dict]:
  """Rows in order as this host's part of fixed batches (fill rows weigh 0)."""
  num_rows = len(rows['inputs'])
  per_host = global_batch // process_count
  lo = process_index * per_host
  total = -(-num_rows // global_batch)
  batches = []
  for k in range(total if num_batches is None else min(num_batches, total)):
    positions = k * global_batch + lo + np.arange(per_host)
    batch = {key: v[positions % num_rows] for key, v in rows.items()}
    batch['weights'] = batch['weights'] * (positions < num_rows)[:, None]
    batches.append(batch)
  return batches


def _texts(examples) -> list[str]:
  out = []
  for e in examples:
    out += ([e.text] + ([e.pair] if e.pair else []) if isinstance(e, Labelled)
            else [e.question, e.context])
  return out


def _split(examples: list, val_fraction: float) -> tuple[list, list]:
  """Training and validation examples: task.val_path, else a hash split."""
  keys = {json.dumps(dataclasses.asdict(e), sort_keys=True): e for e in examples}
  train_keys, val_keys = clean.split_by_hash(list(keys), val_fraction)
  if not val_keys:
    raise UserError('No validation example: set task.val_path or raise data.val_fraction.')
  return [keys[k] for k in train_keys], [keys[k] for k in val_keys]


def prepare(config, log: Log = logging.info, *, get_tokenizer, vocab_floor: int = 0
            ) -> TaskData:
  """Reads the task files, finds or trains the tokenizer, and builds the rows.

  Args:
    config: the full config (``task``, ``data.seq_len``, ``tokenizer``).
    log: receives one line per stage.
    get_tokenizer: ``fn(texts) -> tokenizer`` (``shards.get_tokenizer``'s
      path, cache and training on the task's training texts).
    vocab_floor: the source model's vocabulary with init_from (it may pad
      past the tokenizer's).
  """
  t, head, seq_len = config.task, config.model.head, config.data.seq_len
  if not t.train_path:
    raise UserError(f"model.head={head!r} trains on task examples: set "
                    '--config.task.train_path (and task.val_path).')
  v2 = False
  if head == 'qa':
    train, v2 = read_squad(t.train_path)
    val, val_v2 = read_squad(t.val_path) if t.val_path else (None, False)
    v2 = v2 or val_v2
  else:
    train = read_labelled(t.train_path, t)
    val = read_labelled(t.val_path, t) if t.val_path else None
  if val is None:
    train, val = _split(train, config.data.val_fraction)
  tok = get_tokenizer(_texts(train))
  content = hashlib.sha256(json.dumps(
      [t.to_dict(), seq_len, [dataclasses.asdict(e) for e in train + val]],
      sort_keys=True, default=str).encode()).hexdigest()
  manifest = {'content_sha256': content, 'tokenizer_sha256': tok.sha256,
              'train_examples': len(train), 'val_examples': len(val)}
  if head == 'classification':
    labels = label_set(t, train)
    rows = [classification_rows(x, label_ids(x, labels), tok, seq_len, log)
            for x in (train, val)]
    log(f'Classification: {len(train)} training and {len(val)} validation examples, '
        f'labels {",".join(labels)}')
    return TaskData(head, tok, rows[0], rows[1], manifest, labels=tuple(labels),
                    val_examples=tuple(val), vocab_floor=vocab_floor)
  train_w = qa_windows(train, tok, seq_len, t, train=True, log=log)
  val_w = qa_windows(val, tok, seq_len, t, train=False, log=log)
  log(f'QA (SQuAD {"v2" if v2 else "v1"}): {len(train)} training questions in '
      f'{len(train_w.question_of)} windows, {len(val)} validation questions in '
      f'{len(val_w.question_of)} windows')
  return TaskData(head, tok, train_w.rows, val_w.rows, manifest, val_examples=tuple(val),
                  val_windows=val_w, v2=v2, vocab_floor=vocab_floor)
