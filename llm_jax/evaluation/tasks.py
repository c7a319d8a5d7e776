"""Task evaluation: greedy generation scored by BLEU/ROUGE or exact match.

Task files are JSONL: ``{"prompt", "reference"}`` lines are generated greedily
and scored with BLEU and ROUGE-1/2/L F1; ``{"prompt", "answer"}`` lines by
exact match of the first generated line. ``loop_task_eval`` runs the same
scoring inside the training loop (``train.eval_tasks``).
"""

import json
import os
import types

from llm_jax.core.errors import UserError
from llm_jax.evaluation import scores
from llm_jax.inference import decode
from llm_jax.runs import workdir as workdir_lib


_TASK_BATCH = 8  # Prompts generated together (one compiled shape).


def generate_texts(run, prompts: list[str], max_new_tokens: int) -> list[str]:
  """Greedy continuations of ``prompts`` (the one call into the decoder).

  ``run`` needs ``graphdef``, ``params``, ``model_cfg``, ``tokenizer`` (a
  ``workdir.Run`` or the loop's view). Kept in one place so the KV-cache
  ``decode.generate`` drops in here.
  """
  tok = workdir_lib.require_tokenizer(run)
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
  tasks = read_tasks(config.train.eval_tasks)

  def evaluate_tasks(params, step):
    del step
    view = types.SimpleNamespace(graphdef=trainer.graphdef, params=params,
                                 model_cfg=trainer.model_cfg, tokenizer=tokenizer,
                                 workdir='(training run)')
    got = score_tasks(view, tasks, max_new_tokens=config.train.eval_task_tokens)
    return {f'task_{k}': v for k, v in got.items()
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
    out.update(generation_tasks=len(gen), bleu=scores.bleu(hyps, refs),
               **{k: v for k, v in scores.rouge(hyps, refs).items()})
  if cls:
    preds, answers = map(list, zip(*cls))
    correct, acc = scores.exact_match(preds, answers)
    out.update(answer_tasks=len(cls), exact_match_correct=correct, exact_match=acc)
  out['examples'] = [{'prompt': t['prompt'], 'output': o}
                     for t, o in list(zip(tasks, outputs))[:3]]
  return out
