"""The generate CLI, and the --help of every command: output and errors."""

import os
import subprocess
import sys

import pytest

from llm_jax.inference import decode


def _cli(module, *args):
  return subprocess.run([sys.executable, '-m', module, *args], capture_output=True,
                        text=True, timeout=300,
                        env={**os.environ, 'PYTHONPATH': os.getcwd(),
                             'TF_CPP_MIN_LOG_LEVEL': '3'})


@pytest.mark.parametrize('module', [
    'llm_jax.train', 'llm_jax.generate', 'llm_jax.evaluate', 'llm_jax.export',
    'llm_jax.convert', 'llm_jax.fill_mask', 'llm_jax.bench', 'llm_jax.prune'])
def test_help_exits_0(module):
  proc = _cli(module, '--help')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '--workdir' in proc.stdout


def test_generate_without_checkpoint_is_one_line(tmp_path):
  (tmp_path / 'config.json').write_text('{}')
  proc = _cli('llm_jax.generate', f'--workdir={tmp_path}', '--prompt=x')
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'no complete checkpoint' in last


@pytest.mark.slow  # Uses conftest's trained tiny run.
def test_generate_prints_the_greedy_text_and_refuses_long_prompts(exported_tiny_run):
  run, _, _ = exported_tiny_run
  tok = run.tokenizer
  proc = _cli('llm_jax.generate', f'--workdir={run.workdir}', '--prompt=def main(',
              '--prompt=import os\\n', '--temperature=0', '--max_new_tokens=12')
  assert proc.returncode == 0, proc.stderr[-2000:]
  prompts = [tok.encode('def main('), tok.encode('import os\n')]
  tokens, counts = decode.generate_for_run(run, prompts, max_new_tokens=12)
  want = ''.join(f'--- prompt {i + 1}\n{text}{tok.decode(row[:n])}\n' for i, (text, row, n)
                 in enumerate(zip(['def main(', 'import os\n'], tokens, counts)))
  assert proc.stdout == want
  stream = _cli('llm_jax.generate', f'--workdir={run.workdir}', '--prompt=def main(',
                '--temperature=0', '--max_new_tokens=12', '--stream')
  assert stream.stdout == 'def main(' + tok.decode(tokens[0][:counts[0]]) + '\n'
  long_prompt = ','.join(['5'] * run.model_cfg.max_len)
  proc = _cli('llm_jax.generate', f'--workdir={run.workdir}', f'--prompt_ids={long_prompt}')
  assert proc.returncode == 2
  assert "model's context" in proc.stderr.strip().splitlines()[-1]
