"""--dry_run: compile one step ahead of time and report per-device memory."""

import importlib.util
import os
import subprocess
import sys

import pytest

from llm_jax.training import aot
from llm_jax.core import configuration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None


def tiny(data=1, fsdp=1):
  c = configuration.load_preset('tiny')
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, 1
  return c


def test_fsdp_report_splits_state_eight_ways():
  replicated = aot.dry_run(tiny(data=8))
  split = aot.dry_run(tiny(fsdp=8))
  full = replicated['params_bytes'] + replicated['opt_state_bytes']
  sharded = split['params_bytes'] + split['opt_state_bytes']
  assert sharded <= full / 8 * 1.05, (sharded, full)
  assert split['temp_bytes'] > 0 and split['peak_bytes'] >= sharded
  text = aot.format_report(split)
  assert 'optimizer state' in text and "'fsdp': 8" in text


def test_dry_run_cli_prints_the_report():
  proc = subprocess.run(
      [sys.executable, '-m', 'llm_jax.train', '--config=configs/tiny.py', '--dry_run'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'Dry run: one train step compiled for 4 x cpu' in proc.stdout
  assert 'peak (compiled)' in proc.stdout


def test_unknown_topology_is_one_clear_error():
  with pytest.raises(Exception, match='TPU topology'):
    aot.topology_devices('v99:1x1')


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed: pip install -e "
                    "'.[tpu]' to compile for TPU slices from this machine")
@pytest.mark.slow
def test_gpt2_124m_fits_a_v5p_slice():
  config = configuration.load_preset('gpt2_124m')  # Default machine: h100x8.
  configuration.apply_hardware(config, 'v5p-8', {'v5p-8': 4})
  report = aot.dry_run(config, 'v5p:2x2x1')
  assert report['devices'].startswith('4 x TPU v5')
  assert report['fits'] is True, aot.format_report(report)
