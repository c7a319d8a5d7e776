"""FLOP accounting against a hand count, and the progress line's fields."""

import io
import math

import numpy as np
import pytest

from llm_jax.training import metrics
from llm_jax.model.transformer import ModelConfig


def gpt2_124m() -> ModelConfig:
  return ModelConfig(
      vocab_size=50257, max_len=1024, num_layers=12, d_model=768, num_heads=12,
      num_kv_heads=12, head_dim=64, mlp_dim=3072, norm='layernorm',
      position='learned', mlp='gelu', rope_theta=10000.0, norm_eps=1e-5,
      tie_embeddings=True, use_bias=True, dtype='float32', init_std=0.02)


def test_gpt2_124m_flops_match_hand_count():
  # Per layer: q,k,v,o = 4 * 768 * 768 = 2,359,296; MLP 2 * 768 * 3072 =
  # 4,718,592; 12 layers = 84,934,656; LM head 768 * 50257 = 38,597,376.
  assert metrics.matmul_params(gpt2_124m()) == 123_532_032
  # 6N = 741,192,192; attention 12 * 12 layers * 12 heads * 64 * 1024 = 113,246,208.
  assert metrics.train_flops_per_token(gpt2_124m(), 1024) == 854_438_400


def test_throughput_and_progress_line():
  thr = metrics.Throughput(tokens_per_step=1000, flops_per_token=1e6, peak=1e10)
  thr._marks = [(10, 0.0), (20, 2.0)]  # 10 steps of 1000 tokens in 2 s.
  assert thr.tokens_per_sec() == 5000
  assert math.isclose(thr.mfu(), 0.5)
  out = io.StringIO()
  metrics.ProgressLine(total_steps=100, stream=out).update(
      20, {'loss': 2.0, 'lr': 1e-3, 'grad_norm': 1.0}, thr, final=True)
  line = out.getvalue()
  for field in ('step  20/100', 'loss 2.0000', 'ppl     7.39', '5,000 tok/s',
                'MFU 50.0%', 'ETA 16s'):
    assert field in line, (field, line)


def test_gpt2_124m_mfu_under_the_stated_convention():
  # 100k tokens/s on one H100 (989 TFLOP/s bf16 dense) under the PaLM count:
  # 1e5 * 854,438,400 = 8.544384e13 FLOP/s, 8.64% of the peak.
  thr = metrics.Throughput(tokens_per_step=100_000,
                           flops_per_token=metrics.train_flops_per_token(gpt2_124m(), 1024),
                           peak=989e12)
  thr._marks = [(0, 0.0), (1, 1.0)]
  assert math.isclose(thr.mfu(), 8.544384e13 / 989e12)
  assert math.isclose(thr.mfu(), 0.0863942, rel_tol=1e-6)


class _FullDisk:
  def close(self):
    raise OSError(28, 'No space left on device')


def test_a_failing_run_keeps_its_error_when_the_event_file_cannot_flush(tmp_path, capsys):
  # A full disk fails the checkpoint first; the event file's last flush then
  # fails too and must not replace that error (quiet) but must not pass silently.
  for quiet in (False, True):
    tb = metrics.TensorBoard(str(tmp_path / f'tb{quiet}'))
    tb._records.close()  # pylint: disable=protected-access
    tb._records = _FullDisk()  # pylint: disable=protected-access
    if quiet:
      tb.close(quiet=True)
      assert 'TensorBoard events could not be flushed (No space left on device)' in (
          capsys.readouterr().out)
    else:
      with pytest.raises(OSError):
        tb.close()
    tb.close()  # Closed once: a second close does nothing.


def test_tensorboard_events_read_back_without_tensorflow_in_the_writer(tmp_path):
  tb = metrics.TensorBoard(str(tmp_path / 'tb'))
  tb.scalars(0, {'val_loss': 6.9})
  for step in (1, 2, 3):
    tb.scalars(step, {'loss': 1.0 / step, 'lr': 1e-3 * step})
  tb.close()
  # TensorBoard's own reader (the plots and the tests use it) sees them.
  from llm_jax.evaluation import plots  # pylint: disable=g-import-not-at-top
  scalars = plots.read_scalars(str(tmp_path))
  assert scalars['loss'] == {s: float(np.float32(1.0 / s)) for s in (1, 2, 3)}
  assert scalars['val_loss'] == {0: float(np.float32(6.9))}
  assert metrics.last_logged_step(str(tmp_path / 'tb')) == 3
  # A writer killed mid-record leaves a torn tail: the whole records still count.
  (path,) = (tmp_path / 'tb').iterdir()
  path.write_bytes(path.read_bytes()[:-7])
  assert metrics.last_logged_step(str(tmp_path / 'tb')) == 3
  assert metrics.last_logged_step(str(tmp_path / 'none')) == 0
