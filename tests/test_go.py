"""The Go runtime (serving/go): its unit tests, and llmjax-generate against JAX.

serving/go/build.sh builds the module (cgo over the TensorFlow C API of the
installed wheel); llmjax-generate runs on the SavedModel of conftest's tiny
export and must print the tokens and text JAX generates.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from llm_jax.inference import decode

pytestmark = pytest.mark.skipif(
    shutil.which('go') is None,
    reason='Go is not installed (apt-get install golang-go); serving/go is not built')


@pytest.fixture(scope='module')
def binary(go_build):
  return os.path.join(go_build['bin'], 'llmjax-generate')


@pytest.mark.slow  # Compiles the module's tests (cgo): about 30 s.
def test_go_vet_and_unit_tests_pass(go_build):
  proc = subprocess.run(['bash', go_build['build_sh'], '--test', sys.executable],
                        capture_output=True, text=True, timeout=600, env=go_build['env'])
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  # Every package with tests ran them (a package whose tests vanish says so).
  for package in ('export', 'engine', 'server', 'metrics', 'load', 'tfmodel',
                  'cmd/llmjax-server'):
    assert f'ok  \tllmjax/serving/{package}' in proc.stdout, proc.stdout


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
  proc = subprocess.run([binary, '-model', out, '-ids', '5,x'], capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 2 and 'not a comma-separated list' in proc.stderr


@pytest.mark.slow
def test_go_asks_for_a_re_export_without_signature_tensors(binary, exported_tiny_run,
                                                          tmp_path):
  _, out, _ = exported_tiny_run
  old = tmp_path / 'old'
  shutil.copytree(out, old)
  record = old / 'assets.extra' / 'llm_jax_export.json'
  info = json.loads(record.read_text())
  del info['signature_tensors']
  record.write_text(json.dumps(info))
  proc = subprocess.run([binary, '-model', str(old), '-ids', '5'], capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 1
  assert 'older llm_jax' in proc.stderr and 'export the run again' in proc.stderr
