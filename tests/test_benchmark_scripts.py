"""benchmarks/side_by_side.py and benchmarks/gpu_check.py: their tables and checks."""

import importlib.util
import os
import subprocess
import sys

import pytest

from llm_jax.core import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'benchmarks',
                                                                    f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _runs(*step_s, peak=100e9):
  return [{'step_seconds_median': s, 'peak_flops_samples': [peak], 'tokens_per_step': 1000}
          for s in step_s]


def test_side_by_side_reports_medians_and_ratios_of_medians():
  sbs = _load('side_by_side')
  by_variant = {'torch eager float32': _runs(1.0, 3.0, 2.0),  # median 2.0
                'llm_jax float32': _runs(0.5, 9.0, 1.0),  # median 1.0
                'torch eager autocast bfloat16': _runs(4.0, peak=200e9)}
  report = {'results': {'small': by_variant}, 'isa': ['amx_bf16', 'avx512f'],
            'load_average': ['1.0 1.0 1.0', '2.0 1.5 1.0'], 'rounds': 3, 'steps': 4,
            'warmup': 1, 'threads': 2}
  table = sbs.markdown(report, {'small': 1e8})
  assert '| small | torch eager | float32 | 2,000.0 | 500 | 1.00x | 50% |' in table, table
  assert '| small | llm_jax | float32 | 1,000.0 | 1,000 | 2.00x | 100% |' in table, table
  assert '| small | torch eager autocast | bfloat16 | 4,000.0 | 250 | 0.50x | 12% |' in table
  assert '| torch.mm | 100 | 200 |' in table and '| llm_jax (model.cpu_matmul) | 100 | - |' in table
  assert 'amx_bf16 avx512f' in table and '1.0 1.0 1.0 -> 2.0 1.5 1.0' in table


def test_side_by_side_lists_only_vector_and_matrix_flags():
  sbs = _load('side_by_side')
  flags = sbs.isa_flags()
  assert all(f.startswith(('amx', 'avx512', 'avx2', 'fma')) for f in flags)
  assert host.has_bf16_units(['avx2', 'avx512_bf16']) and host.has_bf16_units(['amx_bf16'])
  assert not host.has_bf16_units(['avx2', 'fma', 'avx512f'])


def test_side_by_side_times_bf16_only_where_asked_or_where_the_cpu_has_bf16_units():
  sbs = _load('side_by_side')
  assert sbs.parse(['--dtypes=float32,bfloat16']).dtypes == ['float32', 'bfloat16']
  expected = ['float32'] + (['bfloat16'] if host.has_bf16_units(sbs.isa_flags()) else [])
  assert sbs.parse([]).dtypes == expected
  with pytest.raises(SystemExit):
    sbs.parse(['--dtypes=bfloat16'])


def test_gpu_check_compares_the_cpu_and_gpu_processes():
  gc = _load('gpu_check')
  cpu = {'losses': [7.0, 6.5, 6.0], 'logits_first': [0.1, 0.2],
         'decode_cached': [1, 2, 3, 4], 'decode_full_recompute': [1, 2, 3, 4]}
  good = {**cpu, 'attention_cudnn_vs_xla_max_abs': 0.01}
  assert all(ok for _, ok, _ in gc.compare(cpu, good))
  bad = {**cpu, 'losses': [7.0, 6.5, 6.1], 'decode_cached': [1, 2, 3, 5],
         'attention_cudnn_vs_xla_max_abs': 0.5}
  failed = [name for name, ok, _ in gc.compare(cpu, bad) if not ok]
  assert failed == ['3 train steps: loss, GPU vs CPU', 'KV-cache greedy = full recompute (GPU)',
                    'cuDNN vs XLA attention (bf16)'], failed


@pytest.mark.slow
def test_gpu_check_dry_runs_end_to_end_on_cpu(tmp_path):
  proc = subprocess.run([sys.executable, 'benchmarks/gpu_check.py', '--dry',
                         f'--out={tmp_path}'], cwd=ROOT, capture_output=True, text=True,
                        timeout=900, env={**os.environ, 'PYTHONPATH': ROOT, 'XLA_FLAGS': ''})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  summary = (tmp_path / 'summary.md').read_text()
  assert '**NO**' not in summary and summary.count('| ok, ') == 5, summary
  for name in ('llama_1b-cudnn', 'llama_1b-xla', 'gpt2_124m'):
    assert (tmp_path / f'bench-{name}.json').exists()
