"""An encoder's task heads at inference: classify texts, answer questions from a context.

``best_spans`` is the extractive-QA span search, in jnp so the SavedModel's
``answer`` signature runs the very same code (``deploy/saved_model.py``): over
each window's context tokens, the start ``i`` and end ``j`` with ``i <= j <
i + max_answer_len`` that maximise ``start[i] + end[j]``; "no answer" scores
``start[0] + end[0]`` (the [CLS] / <s> token). Across a question's windows
the best span wins; in SQuAD v2 "no answer" wins when its lowest score over
the windows beats the best span's by more than ``task.null_threshold`` (as
the official evaluation's null-score threshold does).

Letters as in ``llm_jax/model/transformer.py``; N: windows (rows).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm_jax.core.errors import UserError
from llm_jax.data import tasks as task_data

_BATCH = 16  # Rows per forward pass (one compiled shape).
_NEG = -1e30


def best_spans(start_NT: jax.Array, end_NT: jax.Array, context_NT: jax.Array,
               max_answer_len: int) -> tuple[jax.Array, ...]:
  """Per window: (best span score, its start, its end, the no-answer score).

  Args:
    start_NT, end_NT: float start / end logits.
    context_NT: bool, True at context tokens (an answer lies only there).
    max_answer_len: the longest span, in tokens (static).
  """
  N, T = start_NT.shape  # T may be symbolic (the export's polymorphic length).
  s_NT = jnp.where(context_NT, start_NT, _NEG)
  # Padded past the end, so span k of a start near the end reads "no token".
  e_NS = jnp.concatenate([jnp.where(context_NT, end_NT, _NEG),
                          jnp.full((N, max_answer_len), _NEG, end_NT.dtype)], axis=1)
  best_N = jnp.full((N,), _NEG, jnp.float32)
  start_N = end_N = jnp.zeros((N,), jnp.int32)
  for k in range(max_answer_len):  # Span length k + 1: end = start + k.
    cand_NT = s_NT + jax.lax.slice_in_dim(e_NS, k, k + T, axis=1)
    i_N = jnp.argmax(cand_NT, axis=1).astype(jnp.int32)
    v_N = jnp.take_along_axis(cand_NT, i_N[:, None], axis=1)[:, 0]
    better = v_N > best_N
    best_N = jnp.where(better, v_N, best_N)
    start_N, end_N = jnp.where(better, i_N, start_N), jnp.where(better, i_N + k, end_N)
  return best_N, start_N, end_N, start_NT[:, 0] + end_NT[:, 0]


@functools.lru_cache(maxsize=8)
def _forward(graphdef):
  def run(params, batch):
    return nnx.merge(graphdef, params)(batch['inputs'], segment_ids_BT=batch['segment_ids'],
                                       token_types_BT=batch['token_type_ids'])
  return jax.jit(run)


def head_outputs(graphdef, params, rows: dict) -> np.ndarray:
  """The task head's outputs for every row (batches of ``_BATCH``)."""
  keys = ('inputs', 'segment_ids', 'token_type_ids')
  out = []
  for batch in task_data.row_batches({**{k: rows[k] for k in keys}, 'weights':
                                      np.ones(rows['inputs'].shape, np.float32)},
                                     global_batch=_BATCH):
    out.append(np.asarray(_forward(graphdef)(params, {k: batch[k] for k in keys})))
  return np.concatenate(out)[:len(rows['inputs'])]


@dataclasses.dataclass(frozen=True)
class Answer:
  """A question's answer: ``text`` is ``context[start:end]`` ('' for none)."""
  text: str
  score: float
  start: int
  end: int


def answers(outputs_NT2: np.ndarray, windows: 'task_data.Windows', questions: list, *,
            max_answer_len: int, v2: bool, null_threshold: float = 0.0) -> list[Answer]:
  """Each question's answer from its windows' start/end logits."""
  context_NT = windows.offsets[..., 0] >= 0
  score, start, end, null = (np.asarray(x) for x in jax.jit(
      best_spans, static_argnums=3)(outputs_NT2[..., 0], outputs_NT2[..., 1], context_NT,
                                    max_answer_len))
  out = []
  for qi, q in enumerate(questions):
    rows = np.flatnonzero(windows.question_of == qi)
    r = rows[np.argmax(score[rows])]
    if v2 and null[rows].min() > score[r] + null_threshold:
      out.append(Answer('', float(null[rows].min()), -1, -1))
      continue
    a, b = int(windows.offsets[r, start[r], 0]), int(windows.offsets[r, end[r], 1])
    out.append(Answer(q.context[a:b], float(score[r]), a, b))
  return out


def _require_head(run, head: str) -> None:
  if run.model_cfg.head != head:
    raise UserError(f'{run.workdir} has model.head={run.model_cfg.head!r}, not {head!r}; '
                    'fine-tune one with configs/classify.py or configs/qa.py.')
  if run.tokenizer is None:
    raise UserError(f'{run.workdir} has no tokenizer files; copy the run\'s tokenizer there.')


def classify(run, texts: list[str], pairs: list[str] | None = None
             ) -> list[tuple[str, np.ndarray]]:
  """``(label, probabilities)`` of each text (or pair) with a classifier run."""
  _require_head(run, 'classification')
  labels = [n for n in run.config.task.labels.split(',') if n]
  examples = [task_data.Labelled(t, None if pairs is None else pairs[i], labels[0], '')
              for i, t in enumerate(texts)]
  rows = task_data.classification_rows(examples, np.zeros(len(texts), np.int32),
                                       run.tokenizer, run.model_cfg.max_len, lambda *_: None)
  probs = np.asarray(jax.nn.softmax(head_outputs(run.graphdef, run.params, rows), -1))
  return [(labels[int(np.argmax(p))], p) for p in probs]


def answer(run, question: str, context: str) -> Answer:
  """The answer span of ``context`` for ``question`` with a QA run."""
  _require_head(run, 'qa')
  q = task_data.Question('q', question, context, (), True)
  windows = task_data.qa_windows([q], run.tokenizer, run.model_cfg.max_len, run.config.task,
                                 train=False, log=lambda *_: None)
  outputs = head_outputs(run.graphdef, run.params, windows.rows)
  return answers(outputs, windows, [q], max_answer_len=run.config.task.max_answer_len,
                 v2=True, null_threshold=run.config.task.null_threshold)[0]
