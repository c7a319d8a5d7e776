"""The Go client (serving/go) prints the tokens and text JAX generates.

Builds serving/go with its build.sh (cgo over the TensorFlow C API of the
installed wheel) and runs it on the SavedModel of conftest's tiny export.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from llm_jax.inference import decode

GO_DIR = os.path.join(os.path.dirname(__file__), '..', 'serving', 'go')

pytestmark = pytest.mark.skipif(
    shutil.which('go') is None,
    reason='Go is not installed (apt-get install golang-go); serving/go is not built')


@pytest.fixture(scope='module')
def binary(tmp_path_factory):
  env = {**os.environ, 'GOCACHE': str(tmp_path_factory.mktemp('gocache'))}
  proc = subprocess.run(['bash', os.path.join(GO_DIR, 'build.sh'), sys.executable],
                        capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return os.path.join(GO_DIR, 'llmjax-generate')


def _run_go(binary, model_dir, args):
  proc = subprocess.run([binary, '-model', model_dir, *args], capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]


@pytest.mark.slow  # Builds a cgo program and loads TensorFlow: about a minute.
@pytest.mark.parametrize('sampling', [dict(temperature=0.0),
                                      dict(temperature=0.9, top_k=40, top_p=0.95, seed=3)],
                         ids=['greedy', 'sampled'])
def test_go_prints_the_tokens_and_text_of_jax(binary, exported_tiny_run, sampling):
  run, out, info = exported_tiny_run
  tok = run.tokenizer
  texts = ['def main(', 'import os\nclass Thing:']
  id_prompts = [tok.encode('for i in range('), [tok.eos_id]]
  args = ['-max_new_tokens', '10']
  for key, value in sampling.items():
    args += [f'-{key}', str(value)]
  for p in id_prompts:
    args += ['-ids', ','.join(map(str, p))]
  for t in texts:
    args += ['-text', t]
  rows = _run_go(binary, out, args)
  assert len(rows) == 4
  width = info['max_new_tokens']
  want_tokens, want_counts = decode.generate_for_run(
      run, id_prompts, max_new_tokens=10, width=width, **sampling)
  for row, tokens, count in zip(rows[:2], want_tokens, want_counts):
    assert row['signature'] == 'serving_default'
    assert row['tokens'] == tokens[:count].tolist() and row['count'] == count
  text_ids = [tok.encode(t) for t in texts]
  want_tokens, want_counts = decode.generate_for_run(
      run, text_ids, max_new_tokens=10, width=width, **sampling)
  for row, tokens, count in zip(rows[2:], want_tokens, want_counts):
    assert row['signature'] == 'generate_text'
    assert row['tokens'] == tokens[:count].tolist()
    assert row['text'] == tok.decode(tokens[:count])


@pytest.mark.slow
def test_go_reports_a_bad_request(binary, exported_tiny_run):
  run, out, _ = exported_tiny_run
  proc = subprocess.run([binary, '-model', out, '-ids', f'5,{run.model_cfg.vocab_size}'],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert 'outside the vocabulary' in proc.stderr
