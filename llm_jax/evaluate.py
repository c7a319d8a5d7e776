r"""Evaluate a trained run: ``python -m llm_jax.evaluate --workdir=RUN``.

Language modelling (default): perplexity and bits per byte on the run's own
validation split, through the same windows the training loop evaluates, or on
any source (``--source``, ``--paths``) or text files (``--file=GLOB``). Bits
per byte divide the summed loss by the UTF-8 bytes of the raw text, not by
tokens, so runs with different vocabularies compare. An encoder run reports
its masked-token loss and accuracy instead.

Tasks (``--tasks=FILE.jsonl``): one JSON object per line; ``{"prompt",
"reference"}`` lines are generated greedily and scored with BLEU (sacrebleu)
and ROUGE-1/2/L F1 (rouge-score); ``{"prompt", "answer"}`` lines by exact match
of the first generated line.

Results print as a Markdown table and go to ``<workdir>/eval/<name>.json``.

Plots: ``python -m llm_jax.evaluate --plot --workdir=RUN [--workdir=RUN2]
--out=curves.png`` draws loss and learning-rate curves from ``<workdir>/tb``.

Bad input exits 2 with one line; ``--help`` exits 0.
"""

import argparse
import glob
import json
import math
import os
import sys
import tempfile

import numpy as np

from llm_jax import cli
from llm_jax.errors import UserError

EVAL_DIR = 'eval'
LN2 = math.log(2)
_TASK_BATCH = 8  # Prompts generated together (one compiled shape).


# ---- Scores (pure functions of strings, so tests check them against the libraries).


def bleu(hypotheses: list[str], references: list[str]) -> float:
  """Corpus BLEU (0-100) with sacrebleu's defaults (13a tokenisation)."""
  import sacrebleu  # pylint: disable=g-import-not-at-top
  return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def rouge(hypotheses: list[str], references: list[str]) -> dict[str, float]:
  """Mean ROUGE-1/2/L F1 (0-1) over pairs, rouge-score with stemming."""
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  kinds = ('rouge1', 'rouge2', 'rougeL')
  scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
  totals = dict.fromkeys(kinds, 0.0)
  for hyp, ref in zip(hypotheses, references):
    scores = scorer.score(ref, hyp)  # (target, prediction)
    for k in kinds:
      totals[k] += scores[k].fmeasure
  return {k: v / max(len(hypotheses), 1) for k, v in totals.items()}


def first_line(text: str) -> str:
  """What a classification-style answer is compared on."""
  return text.strip().split('\n', 1)[0].strip()


def exact_match(predictions: list[str], answers: list[str]) -> tuple[int, float]:
  """Correct count and accuracy of first lines against stripped answers."""
  correct = sum(first_line(p) == a.strip() for p, a in zip(predictions, answers))
  return correct, correct / max(len(answers), 1)


# ---- Language-modelling metrics.


def _eval_fn(run):
  """The training loop's eval step, jitted for the run's graph, one device."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from llm_jax import trainer  # pylint: disable=g-import-not-at-top
  return jax.jit(functools.partial(trainer.eval_step, graphdef=run.graphdef))


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
  from llm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  for lo in range(0, len(indices), batch_size):
    yield pipeline._split_window(windows.gather(indices[lo:lo + batch_size]))  # pylint: disable=protected-access


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
  import ml_collections  # pylint: disable=g-import-not-at-top
  from llm_jax.data import masking, pipeline, shards  # pylint: disable=g-import-not-at-top
  from llm_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  if split not in ('val', 'train'):
    raise UserError(f"--split={split!r}: use 'val' or 'train'.")
  _require_tokenizer(run)
  config = ml_collections.ConfigDict(run.config.to_dict())
  if source:
    config.data.source, config.data.paths = source, paths
    config.data.max_documents = 0
  # The run's own tokenizer: never retrain, whatever the cache holds.
  config.tokenizer.path = os.path.join(run.workdir, workdir_lib.TOKENIZER_FILE)
  data = shards.prepare(config, log=log)
  if data.tokenizer.sha256 != run.meta.get('tokenizer_sha256', data.tokenizer.sha256):
    raise UserError(f'The tokenizer in {run.workdir} is not the one its checkpoint '
                    'was trained with; restore tokenizer.model from the run.')
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
  files = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
  if not files:
    raise UserError(f'--file={pattern!r} matches no file; pass a glob such as data/*.txt.')
  tok = _require_tokenizer(run)
  tokens, text_bytes = [], 0
  for path in files:
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
  return {'data': f'{len(files)} file(s) {pattern}', **out}


def _require_tokenizer(run):
  if run.tokenizer is None:
    raise UserError(f'{run.workdir} has no tokenizer.model; copy the tokenizer the '
                    'run was trained with there.')
  return run.tokenizer


# ---- Tasks: generation and exact match.


def generate_texts(run, prompts: list[str], max_new_tokens: int) -> list[str]:
  """Greedy continuations of ``prompts`` (the one call into the decoder).

  ``run`` needs ``graphdef``, ``params``, ``model_cfg``, ``tokenizer`` (a
  ``workdir.Run`` or the loop's view). Kept in one place so the KV-cache
  ``decode.generate`` drops in here.
  """
  from llm_jax import decode  # pylint: disable=g-import-not-at-top
  tok = _require_tokenizer(run)
  out = []
  for lo in range(0, len(prompts), _TASK_BATCH):
    chunk = [tok.encode(p) for p in prompts[lo:lo + _TASK_BATCH]]
    n = len(chunk)
    chunk += [chunk[0]] * (_TASK_BATCH - n)  # One compiled shape for every chunk.
    new = decode.generate(run.graphdef, run.params, chunk, max_new_tokens=max_new_tokens,
                          temperature=0.0, seed=0, max_len=run.model_cfg.max_len,
                          pad_id=tok.pad_id, eos_id=tok.eos_id)
    out.extend(tok.decode(ids) for ids in new[:n])
  return out


def loop_task_eval(config, trainer, tokenizer):
  """The training loop's task scorer for ``train.eval_tasks``.

  Reads the tasks now (a bad file stops the run before training) and returns
  ``fn(params, step) -> {'task_bleu': ..., 'task_rougeL': ..., ...}``.
  """
  import types  # pylint: disable=g-import-not-at-top
  tasks = read_tasks(config.train.eval_tasks)

  def evaluate_tasks(params, step):
    del step
    view = types.SimpleNamespace(graphdef=trainer.graphdef, params=params,
                                 model_cfg=trainer.model_cfg, tokenizer=tokenizer,
                                 workdir='(training run)')
    scores = score_tasks(view, tasks, max_new_tokens=config.train.eval_task_tokens)
    return {f'task_{k}': v for k, v in scores.items()
            if k in ('bleu', 'rouge1', 'rouge2', 'rougeL', 'exact_match')}

  return evaluate_tasks


def read_tasks(path: str) -> list[dict]:
  """The task lines: each has "prompt" and "reference" or "answer"."""
  tasks = []
  try:
    with open(os.path.expanduser(path), encoding='utf-8') as f:
      lines = f.readlines()
  except OSError as e:
    raise UserError(f'Cannot read the tasks file {path}: {e.strerror}.') from None
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      task = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f'{path}:{number} is not JSON ({e.msg}); write one object per line.') from None
    if (not isinstance(task, dict) or not isinstance(task.get('prompt'), str)
        or not isinstance(task.get('reference', task.get('answer')), str)):
      raise UserError(f'{path}:{number} needs a string "prompt" and a string '
                      '"reference" (generation) or "answer" (exact match).')
    tasks.append(task)
  if not tasks:
    raise UserError(f'The tasks file {path} has no task lines.')
  return tasks


def score_tasks(run, tasks: list[dict], *, max_new_tokens: int = 32) -> dict:
  """BLEU/ROUGE over reference tasks, exact match over answer tasks."""
  if not run.model_cfg.causal:
    raise UserError('--tasks needs a decoder run (an encoder does not generate); '
                    'use python -m llm_jax.fill_mask for an encoder.')
  outputs = generate_texts(run, [t['prompt'] for t in tasks], max_new_tokens)
  gen = [(o, t['reference']) for o, t in zip(outputs, tasks) if 'reference' in t]
  cls = [(o, t['answer']) for o, t in zip(outputs, tasks) if 'reference' not in t]
  out = {}
  if gen:
    hyps, refs = map(list, zip(*gen))
    out.update(generation_tasks=len(gen), bleu=bleu(hyps, refs),
               **{k: v for k, v in rouge(hyps, refs).items()})
  if cls:
    preds, answers = map(list, zip(*cls))
    correct, acc = exact_match(preds, answers)
    out.update(answer_tasks=len(cls), exact_match_correct=correct, exact_match=acc)
  out['examples'] = [{'prompt': t['prompt'], 'output': o}
                     for t, o in list(zip(tasks, outputs))[:3]]
  return out


# ---- Output.


def write_json(workdir: str, name: str, results: dict) -> str:
  """Writes ``<workdir>/eval/<name>.json`` whole or not at all."""
  directory = os.path.join(workdir, EVAL_DIR)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f'{name}.json')
  fd, tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix='.tmp', dir=directory)
  with os.fdopen(fd, 'w') as f:
    json.dump(results, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)
  return path


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


# ---- Plots from TensorBoard events.


def read_scalars(workdir: str) -> dict[str, dict[int, float]]:
  """Every scalar in ``<workdir>/tb``: tag -> {step: value} (later files win)."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  logdir = os.path.join(workdir, 'tb')
  if not os.path.isdir(logdir) or not os.listdir(logdir):
    raise UserError(f'{workdir} has no TensorBoard events in {logdir}; pass the '
                    '--workdir of a training run.')
  acc = event_accumulator.EventAccumulator(
      logdir, size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0})
  acc.Reload()
  out = {}
  # tf.summary (TF2) writes scalars as tensor events; older writers as scalars.
  for tag in acc.Tags().get('tensors', []):
    out[tag] = {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
                for e in acc.Tensors(tag)}
  for tag in acc.Tags().get('scalars', []):
    out[tag] = {e.step: float(e.value) for e in acc.Scalars(tag)}
  return out


def plot(workdirs: list[str], out_path: str) -> str:
  """Loss (train and validation) and learning-rate curves of runs, as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(12, 4.5))
  for i, workdir in enumerate(workdirs):
    scalars = read_scalars(workdir)
    name, color = os.path.basename(os.path.normpath(workdir)), f'C{i}'
    for tag, ax, style, label in (('loss', ax_loss, '-', 'train'),
                                  ('val_loss', ax_loss, 'o--', 'val'),
                                  ('lr', ax_lr, '-', None)):
      if tag in scalars:
        steps = sorted(scalars[tag])
        ax.plot(steps, [scalars[tag][s] for s in steps], style, color=color,
                label=f'{name} {label}' if label else name, markersize=4)
  ax_loss.set(title='Loss', xlabel='step', ylabel='nats / token')
  ax_lr.set(title='Learning rate', xlabel='step', ylabel='learning rate')
  for ax in (ax_loss, ax_lr):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  out_path = os.path.abspath(out_path)
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  tmp = f'{out_path}.tmp-{os.getpid()}.png'
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, out_path)
  return out_path


# ---- CLI.


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    cli.fail(f'{message}. See python -m llm_jax.evaluate --help.')


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog='python -m llm_jax.evaluate', description=__doc__.split('\n\n')[0],
              formatter_class=argparse.RawDescriptionHelpFormatter,
              epilog=__doc__.split('\n\n', 1)[1])
  p.add_argument('--workdir', action='append', default=[],
                 help='Run directory; repeat with --plot to compare runs.')
  p.add_argument('--step', type=int, default=None, help='Checkpoint step (default newest).')
  p.add_argument('--split', default='val', help="'val' (default) or 'train'.")
  p.add_argument('--source', default='', help='Another data.source to read (text, jsonl, tfds, default).')
  p.add_argument('--paths', default='', help='data.paths for --source.')
  p.add_argument('--file', default='', help='Glob of text files to score whole.')
  p.add_argument('--eval_batches', type=int, default=None,
                 help='Batches (default train.eval_batches: the loop\'s windows); 0: every window.')
  p.add_argument('--batch_size', type=int, default=None, help='Rows per batch (default train.batch_size).')
  p.add_argument('--tasks', default='', help='JSONL of {"prompt","reference"} / {"prompt","answer"}.')
  p.add_argument('--max_new_tokens', type=int, default=32, help='Generated tokens per task.')
  p.add_argument('--name', default='', help='Results file name under <workdir>/eval/ (no .json).')
  p.add_argument('--plot', action='store_true', help='Draw loss/LR curves instead of evaluating.')
  p.add_argument('--out', default='', help='With --plot: the PNG to write.')
  return p


def _result_name(args) -> str:
  if args.name:
    return args.name
  if args.tasks:
    return 'tasks-' + os.path.splitext(os.path.basename(args.tasks))[0]
  if args.file:
    return 'file-' + ''.join(c if c.isalnum() else '_' for c in args.file).strip('_')
  return f'{args.source or "data"}-{args.split}'


def run_cli(args) -> dict:
  """Evaluates (or plots) as the parsed flags say; returns the results."""
  if not args.workdir:
    raise UserError('No run given. Pass --workdir=RUN (the directory a training run wrote).')
  if args.plot:
    if not args.out:
      raise UserError('--plot needs --out=FILE.png.')
    path = plot(args.workdir, args.out)
    print(f'Wrote {path}')
    return {'plot': path}
  if len(args.workdir) > 1:
    raise UserError('Give one --workdir to evaluate (several only with --plot).')
  from llm_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  run = workdir_lib.load(args.workdir[0], args.step)
  results = {'workdir': run.workdir, 'step': run.step}
  if args.tasks:
    results.update(tasks=args.tasks, **score_tasks(
        run, read_tasks(args.tasks), max_new_tokens=args.max_new_tokens))
  elif args.file:
    results.update(evaluate_files(run, args.file, batch_size=args.batch_size))
  else:
    results.update(evaluate_split(run, split=args.split, source=args.source,
                                  paths=args.paths, num_batches=args.eval_batches,
                                  batch_size=args.batch_size))
  path = write_json(run.workdir, _result_name(args), results)
  print(markdown_table(results))
  print(f'\nWrote {path}')
  return results


def main(argv: list[str] | None = None) -> None:
  args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
  import logging  # pylint: disable=g-import-not-at-top
  logging.getLogger('absl').setLevel(logging.WARNING)
  try:
    run_cli(args)
  except UserError as e:
    cli.fail(str(e))


if __name__ == '__main__':
  main()
