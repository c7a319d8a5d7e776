"""The evaluate CLI: perplexity equals the loop's, bits per byte by hand, task scores, plots."""

import json
import math
import os
import struct
import subprocess
import sys

import pytest

from llm_jax.core import configuration
from llm_jax import evaluate
from llm_jax.evaluation import lm, plots, scores
from llm_jax.evaluation import tasks as tasks_lib
from llm_jax import train
from llm_jax.runs import workdir as workdir_lib
from llm_jax.data import clean, sources
from llm_jax.core.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(cache_dir, **train_overrides):
  c = configuration.load_preset('tiny')
  c.data.cache_dir = str(cache_dir)
  c.data.max_documents = 120
  c.train.steps = 12
  c.train.eval_every = 6
  c.train.num_samples = 0
  c.optim.warmup_steps = 2
  c.checkpoint.every = 12
  for key, value in train_overrides.items():
    c.train[key] = value
  return c


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Two tiny trained runs (different learning rates); the first scores tasks in-loop."""
  base = tmp_path_factory.mktemp('runs')
  tasks = base / 'tasks.jsonl'
  tasks.write_text(json.dumps({'prompt': 'import ', 'reference': 'os\n'}) + '\n' +
                   json.dumps({'prompt': 'def ', 'answer': 'main'}) + '\n')
  a = _tiny(base / 'cache', eval_tasks=str(tasks), eval_task_tokens=4)
  result_a = train.run(a, str(base / 'lr5e-3'))
  b = _tiny(base / 'cache')
  b.optim.learning_rate = 1e-3
  result_b = train.run(b, str(base / 'lr1e-3'))
  return {'config': a, 'dirs': [str(base / 'lr5e-3'), str(base / 'lr1e-3')],
          'results': [result_a, result_b], 'base': base}


def test_perplexity_equals_the_training_loops_eval(runs):
  run = workdir_lib.load(runs['dirs'][0])
  out = lm.evaluate_split(run, log=lambda _: None)
  loop = runs['results'][0]
  # Same windows, same step function, one device instead of eight.
  assert out['perplexity'] == pytest.approx(math.exp(loop['val_loss']), rel=1e-4)
  assert out['bits_per_byte'] == pytest.approx(loop['val_bpb'], rel=1e-4)
  # A different batch size regroups the same windows: same figure.
  regrouped = lm.evaluate_split(run, batch_size=3, log=lambda _: None)
  assert regrouped['perplexity'] == pytest.approx(out['perplexity'], rel=1e-4)


def test_bits_per_byte_from_the_raw_text(runs):
  config = runs['config']
  run = workdir_lib.load(runs['dirs'][0])
  out = lm.evaluate_split(run, log=lambda _: None)
  # By hand: the validation documents' UTF-8 bytes and tokens (+1 eos each).
  docs, _ = clean.clean_documents(sources.iter_documents(config.data), config.data.min_doc_chars)
  _, val_docs = clean.split_by_hash(docs, config.data.val_fraction)
  text_bytes = sum(len(d.encode('utf-8')) for d in val_docs)
  tokens = sum(len(run.tokenizer.encode(d)) + 1 for d in val_docs)
  assert out['text_bytes'] == text_bytes and out['text_tokens'] == tokens
  assert out['bits_per_byte'] == pytest.approx(out['loss'] * tokens / text_bytes / math.log(2),
                                               rel=1e-12)
  assert 0.5 < out['bits_per_byte'] < 8  # A 12-step model on code: between.


def test_file_bits_per_byte_counts_bytes_not_characters(runs, tmp_path):
  text = 'def grüße(x):\n    return "héllo wörld" * x  # ünïcödé\n' * 40
  (tmp_path / 'a.txt').write_text(text, encoding='utf-8')
  run = workdir_lib.load(runs['dirs'][0])
  out = lm.evaluate_files(run, str(tmp_path / '*.txt'))
  assert out['text_bytes'] == len(text.encode('utf-8')) > len(text)
  assert out['text_tokens'] == len(run.tokenizer.encode(text)) + 1
  assert out['bits_per_byte'] == pytest.approx(
      out['loss'] * out['text_tokens'] / out['text_bytes'] / math.log(2), rel=1e-12)


def test_bleu_and_rouge_against_the_libraries():
  refs = ['the cat sat on the mat', 'the quick brown fox jumps over']
  assert scores.bleu(refs, refs) == pytest.approx(100.0)
  assert scores.rouge(refs, refs) == pytest.approx(
      {'rouge1': 1.0, 'rouge2': 1.0, 'rougeL': 1.0})
  hyps = ['the cat is on the mat', 'a quick brown dog jumps']
  # Golden values from sacrebleu 2.6.0 / rouge-score 0.1.2 (drift = a library change).
  assert scores.bleu(hyps, refs) == pytest.approx(23.802516198921506, rel=1e-9)
  import sacrebleu  # pylint: disable=g-import-not-at-top
  assert scores.bleu(hyps, refs) == sacrebleu.corpus_bleu(hyps, [refs]).score
  got = scores.rouge(hyps, refs)
  # ROUGE-1 by hand: 5/6 overlap (F 5/6), then 3 of 5 vs 6 words (F 6/11).
  assert got['rouge1'] == pytest.approx((5 / 6 + 6 / 11) / 2, rel=1e-9)
  assert got['rouge2'] == pytest.approx(0.4111111111111111, rel=1e-9)
  assert got['rougeL'] == pytest.approx(0.6893939393939394, rel=1e-9)


def test_exact_match_counts():
  preds = ['Paris\nand more text', ' London ', 'x', 'Rome']
  assert scores.exact_match(preds, ['Paris', 'London', 'y', 'rome']) == (2, 0.5)


def test_tasks_cli_scores_the_models_own_answer(runs, tmp_path, capsys):
  run = workdir_lib.load(runs['dirs'][0])
  prompts = ['import ', 'class ', 'def ']
  outputs = tasks_lib.generate_texts(run, prompts, 6)
  lines = [{'prompt': prompts[0], 'reference': outputs[0]},
           {'prompt': prompts[1], 'answer': scores.first_line(outputs[1])},
           {'prompt': prompts[2], 'answer': 'certainly not this'}]
  tasks = tmp_path / 'tasks.jsonl'
  tasks.write_text(''.join(json.dumps(l) + '\n' for l in lines))
  evaluate.main([f'--workdir={runs["dirs"][0]}', f'--tasks={tasks}', '--max_new_tokens=6',
                 '--name=mine'])
  printed = capsys.readouterr().out
  assert '| exact_match | 0.5000 |' in printed
  saved = json.loads(open(os.path.join(runs['dirs'][0], 'eval', 'mine.json')).read())
  assert saved['exact_match_correct'] == 1 and saved['answer_tasks'] == 2
  if outputs[0].strip():  # Its own output as reference: a perfect score.
    assert saved['rouge1'] == pytest.approx(1.0)
  # The in-loop scorer logged the same kind of metrics.
  assert 'task_exact_match' in runs['results'][0] and 'task_bleu' in runs['results'][0]


def test_plot_two_runs(runs, tmp_path):
  out = plots.plot(runs['dirs'], os.environ.get('LLM_JAX_KEEP_PLOT', str(tmp_path / 'curves.png')))
  data = open(out, 'rb').read()
  assert data[:8] == b'\x89PNG\r\n\x1a\n'
  width, height = struct.unpack('>II', data[16:24])
  assert (width, height) == (1200, 450) and len(data) > 20_000
  scalars = plots.read_scalars(runs['dirs'][0])
  assert {10, 12} <= set(scalars['loss']) and {10, 12} <= set(scalars['lr'])
  assert sorted(scalars['val_loss']) == [0, 6, 12] and 'val_bpb' in scalars


def test_cli_help_and_bad_input(tmp_path):
  env = {**os.environ, 'PYTHONPATH': ROOT}
  ok = subprocess.run([sys.executable, '-m', 'llm_jax.evaluate', '--help'],
                      capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
  assert ok.returncode == 0 and '--tasks' in ok.stdout
  bad = subprocess.run([sys.executable, '-m', 'llm_jax.evaluate', f'--workdir={tmp_path}'],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
  assert bad.returncode == 2
  assert bad.stderr.strip().count('\n') == 0 and 'no config.json' in bad.stderr


@pytest.mark.parametrize('name', ['./../../escape', '../../escape', 'a/b', '..'])
def test_name_cannot_leave_the_run_directory(runs, capsys, name):
  """--name once wrote <workdir>/eval/../../escape.json outside the run."""
  workdir, base = runs['dirs'][0], runs['base']
  listing = lambda: sorted(str(p) for p in base.parent.rglob('*'))  # pylint: disable=unnecessary-lambda-assignment
  before = listing()
  with pytest.raises(SystemExit) as e:
    evaluate.main([f'--workdir={workdir}', f'--name={name}', '--eval_batches=1'])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: --name='), err
  assert listing() == before, 'something was written'


def test_bad_tasks_file(tmp_path):
  (tmp_path / 't.jsonl').write_text('{"prompt": "x"}\n')
  with pytest.raises(UserError, match=r't.jsonl:1 needs a string "prompt"'):
    tasks_lib.read_tasks(str(tmp_path / 't.jsonl'))
