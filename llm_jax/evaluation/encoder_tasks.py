"""Scores of an encoder's task heads: classification and SQuAD extractive QA.

Classification: accuracy, macro-F1 (the mean over labels of each label's F1)
and the confusion matrix (rows: the true label, columns: the predicted one),
beside the majority-class baseline. QA: the official SQuAD exact match and F1
(v1.1 and v2.0 evaluation scripts: answers normalised by lowercasing and
removing punctuation, articles and extra whitespace; the best score over a
question's gold answers; an unanswerable question is right only with an
empty answer), in percent, with the answerable and unanswerable parts apart
for v2.
"""

import collections
import re
import string
import types

import numpy as np

from llm_jax.core.errors import UserError
from llm_jax.data import tasks as task_data
from llm_jax.inference import tasks as infer

_ARTICLES = re.compile(r'\b(a|an|the)\b', re.UNICODE)
_PUNCTUATION = set(string.punctuation)


# ---- Classification.


def classification_scores(predicted: np.ndarray, gold: np.ndarray,
                          labels: list[str]) -> dict:
  """Accuracy, macro-F1, the confusion matrix and the majority-class baseline."""
  n = len(labels)
  confusion = np.zeros((n, n), np.int64)
  np.add.at(confusion, (gold, predicted), 1)
  tp = np.diag(confusion).astype(np.float64)
  precision = tp / np.maximum(confusion.sum(0), 1)
  recall = tp / np.maximum(confusion.sum(1), 1)
  f1 = np.where(tp > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
  counts = confusion.sum(1)
  return {'accuracy': float(tp.sum() / max(len(gold), 1)), 'macro_f1': float(f1.mean()),
          'majority_baseline': float(counts.max() / max(len(gold), 1)),
          'majority_label': labels[int(np.argmax(counts))], 'examples': int(len(gold)),
          'labels': list(labels), 'confusion': confusion.tolist()}


def confusion_table(labels: list[str], confusion: list[list[int]]) -> str:
  """The confusion matrix as Markdown: a row per true label, a column per predicted."""
  lines = ['| true \\ predicted | ' + ' | '.join(labels) + ' |',
           '| --- |' + ' --- |' * len(labels)]
  lines += [f'| {name} | ' + ' | '.join(map(str, row)) + ' |'
            for name, row in zip(labels, confusion)]
  return '\n'.join(lines)


# ---- SQuAD (the official evaluation, v1.1 and v2.0).


def normalize_answer(text: str) -> str:
  """Lowercase; drop punctuation and articles; single spaces (the official script)."""
  text = ''.join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return ' '.join(_ARTICLES.sub(' ', text).split())


def exact_match(prediction: str, gold: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
  """Token-overlap F1; with an empty side, 1 only if both are empty (v2.0)."""
  pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
  if not pred or not ref:
    return float(pred == ref)
  common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if common == 0:
    return 0.0
  p, r = common / len(pred), common / len(ref)
  return 2 * p * r / (p + r)


def squad_scores(predictions: dict[str, str], questions: list) -> dict:
  """Exact match and F1 in percent (and the answerable / unanswerable parts)."""
  parts = {'all': [], 'has_answer': [], 'no_answer': []}
  for q in questions:
    golds = [a for a, _ in q.answers if normalize_answer(a)] or ['']
    pred = predictions.get(q.qid, '')
    pair = (max(exact_match(pred, g) for g in golds), max(f1(pred, g) for g in golds))
    parts['all'].append(pair)
    parts['no_answer' if golds == [''] else 'has_answer'].append(pair)
  out = {}
  for name, pairs in parts.items():
    if pairs and (name == 'all' or parts['no_answer']):
      prefix = '' if name == 'all' else f'{name}_'
      out[f'{prefix}exact_match'] = 100 * float(np.mean([p[0] for p in pairs]))
      out[f'{prefix}f1'] = 100 * float(np.mean([p[1] for p in pairs]))
      out[f'{prefix}total'] = len(pairs)
  return out


# ---- Whole runs.


def evaluate(view, data: 'task_data.TaskData', task_cfg) -> dict:
  """The task's scores of ``view`` (graphdef, params) on ``data``'s validation rows."""
  outputs = infer.head_outputs(view.graphdef, view.params, data.val_rows)
  if data.head == 'classification':
    gold = data.val_rows['labels'][:, 0]
    return classification_scores(np.argmax(outputs, -1), gold, list(data.labels))
  got = infer.answers(outputs, data.val_windows, list(data.val_examples),
                      max_answer_len=task_cfg.max_answer_len, v2=data.v2,
                      null_threshold=task_cfg.null_threshold)
  predictions = {q.qid: a.text for q, a in zip(data.val_examples, got)}
  return squad_scores(predictions, list(data.val_examples))


def loop_task_eval(config, trainer, data: 'task_data.TaskData'):
  """The training loop's scorer: ``fn(params, step) -> {'task_...': ...}``."""
  keys = ('accuracy', 'macro_f1', 'exact_match', 'f1')

  def evaluate_task(params, step):
    del step
    _, graphdef, unrolled = trainer.unrolled(params)
    view = types.SimpleNamespace(graphdef=graphdef, params=unrolled)
    got = evaluate(view, data, config.task)
    return {f'task_{k}': v for k, v in got.items() if k in keys}

  return evaluate_task


def evaluate_run(run, path: str) -> dict:
  """Scores a task run on ``path`` (default: its ``task.val_path``)."""
  t = run.config.task
  path = path or t.val_path
  if not path:
    raise UserError(f'{run.workdir} has no task.val_path; pass --task_data=FILE.')
  seq_len, log = run.model_cfg.max_len, lambda *_: None
  if run.model_cfg.head == 'classification':
    labels = [n for n in t.labels.split(',') if n]
    examples = task_data.read_labelled(path, t)
    rows = task_data.classification_rows(examples, task_data.label_ids(examples, labels),
                                         run.tokenizer, seq_len, log)
    data = task_data.TaskData('classification', run.tokenizer, rows, rows, {},
                              labels=tuple(labels), val_examples=tuple(examples))
  else:
    questions, v2 = task_data.read_squad(path)
    windows = task_data.qa_windows(questions, run.tokenizer, seq_len, t, train=False, log=log)
    data = task_data.TaskData('qa', run.tokenizer, windows.rows, windows.rows, {},
                              val_examples=tuple(questions), val_windows=windows, v2=v2)
  return {'task_data': path, **evaluate(run, data, t)}
