"""FLOP and MFU accounting, throughput, the progress line and TensorBoard events."""

import functools
import os
import socket
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.model import cpu_matmul

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets. Matched
# against ``device.device_kind`` (lower-cased), most specific first.
PEAK_FLOPS_BY_KIND = (
    ('v6 lite', 918e12), ('v6e', 918e12),
    ('v5 lite', 197e12), ('v5e', 197e12),
    ('v5p', 459e12), ('v5', 459e12),
    ('v4', 275e12),
    ('h200', 989e12), ('h100', 989e12), ('gh200', 989e12),
    ('a100', 312e12), ('l4', 121e12),
)


def matmul_params(cfg) -> int:
  """Parameters that take part in a matmul per token: all kernels and the LM head.

  The input embedding (a lookup) and learned positions (an add) are left out;
  norms and biases are too small to matter.
  """
  attn = cfg.d_model * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  mlp = (3 if cfg.mlp == 'swiglu' else 2) * cfg.d_model * cfg.mlp_dim
  return cfg.num_layers * (attn + mlp) + cfg.d_model * cfg.vocab_size


def train_flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token, the PaLM convention (Chowdhery et al., app. B).

  6 * N for the matmuls (2 forward + 4 backward per parameter), where N is
  ``matmul_params``, plus 12 * layers * heads * head_dim * seq_len for the
  attention scores and the weighted sum of values (forward and backward). The
  causal mask is not discounted, as in PaLM and MaxText, so figures compare.
  """
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
  return 6 * matmul_params(cfg) + attention


def measure_cpu_matmul_peak(n: int = 2048, repeats: int = 5,
                            dtype: str = 'float32', backend: str = 'xla') -> float:
  """FLOP/s of an ``n^3`` matmul through ``jax.jit`` on this host, best of N.

  CPUs have no data-sheet peak that XLA reaches, and shared machines drift by
  20%, so MFU on CPU is measured against this figure taken in the same run.
  ``dtype`` is the operands' dtype (fp32 by default; 'bfloat16' for a bf16
  model, whose matmuls XLA:CPU runs at a different rate). ``backend`` is a
  ``model.cpu_matmul`` value: the product runs as the model's dense layers
  run theirs (XLA's dot for 'xla'; oneMKL on CPU for 'auto' and 'mkl').
  """
  dev = jax.local_devices()[0]
  a = jax.device_put(jnp.ones((n, n), dtype), dev)
  mm = jax.jit(functools.partial(cpu_matmul.matmul, backend=backend))
  mm(a, a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    mm(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def peak_flops(configured: float = 0.0) -> tuple[float, str]:
  """Peak FLOP/s of all devices together, and where the figure comes from."""
  devices = jax.devices()
  if configured > 0:
    return configured * len(devices), f'train.peak_flops={configured:.3g}/device'
  if devices[0].platform == 'cpu':
    # Simulated CPU devices share one host's cores: the host is the unit.
    peak = measure_cpu_matmul_peak()
    return peak, f'fp32 2048^3 matmul measured now: {peak / 1e9:.0f} GFLOP/s'
  kind = devices[0].device_kind.lower()
  for key, value in PEAK_FLOPS_BY_KIND:
    if key in kind:
      return value * len(devices), f'{devices[0].device_kind} bf16 peak x{len(devices)}'
  return float('nan'), f'unknown peak for {devices[0].device_kind}; set train.peak_flops'


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s' if m else f'{s}s'


class Throughput:
  """Tokens/s and MFU over a sliding window of recent steps."""

  def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float):
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = flops_per_token
    self.peak = peak
    self._marks: list[tuple[int, float]] = []
    self._last_rate = float('nan')

  def mark(self, step: int) -> None:
    self._marks.append((step, time.perf_counter()))
    del self._marks[:-20]

  def restart(self) -> None:
    """Forgets earlier marks, so a pause (eval, save) is not counted."""
    self._last_rate = self.tokens_per_sec()
    self._marks.clear()

  def tokens_per_sec(self) -> float:
    """Over the recent window; just after a restart, the window before it."""
    if len(self._marks) < 2:
      return self._last_rate
    (s0, t0), (s1, t1) = self._marks[0], self._marks[-1]
    return (s1 - s0) * self.tokens_per_step / max(t1 - t0, 1e-9)

  def mfu(self) -> float:
    return self.tokens_per_sec() * self.flops_per_token / self.peak

  def seconds_per_step(self) -> float:
    return self.tokens_per_step / self.tokens_per_sec()


# What every train step reports; anything else is an objective's own metric.
_STEP_KEYS = ('loss', 'grad_norm', 'lr', 'finite')


class ProgressLine:
  """One line per log interval; on a terminal it also refreshes in place."""

  def __init__(self, total_steps: int, stream=None):
    self.total = total_steps
    self.stream = stream or sys.stdout
    self.live = self.stream.isatty()
    self.enabled = jax.process_index() == 0

  def text(self, step: int, m: dict, thr: Throughput) -> str:
    eta = (self.total - step) * thr.seconds_per_step()
    eta_s = format_duration(eta) if np.isfinite(eta) else '?'
    # An objective's own metrics (reward accuracy, KL, ...) replace perplexity.
    extra = [k for k in m if k not in _STEP_KEYS]
    middle = (''.join(f'{k} {m[k]:.4f} | ' for k in extra) if extra else
              f'ppl {np.exp(min(m["loss"], 50)):8.2f} | ')
    return (f'step {step:>{len(str(self.total))}}/{self.total} | '
            f'loss {m["loss"]:.4f} | {middle}'
            f'{thr.tokens_per_sec():7,.0f} tok/s | MFU {100 * thr.mfu():4.1f}% | '
            f'lr {m["lr"]:.2e} | ETA {eta_s}')

  def update(self, step: int, m: dict, thr: Throughput, final: bool) -> None:
    """Writes the line; ``final`` ends it with a newline (a log interval)."""
    if not self.enabled:
      return
    if final:
      self.stream.write(('\r' if self.live else '') + self.text(step, m, thr) + '\n')
    elif self.live:
      self.stream.write('\r' + self.text(step, m, thr))
    self.stream.flush()


class TensorBoard:
  """Scalars to ``<workdir>/tb``; a no-op on every process but 0.

  Events are written with the ``tensorboard`` package's record writer, not
  ``tf.summary``: a training process then never imports TensorFlow, which
  cost seconds at start-up and again at exit. The files are what
  ``tf.summary.scalar`` writes (tensor summaries of the scalars plugin).
  """

  FLUSH_SECONDS = 10.0  # At most this much of the curve is lost to kill -9.

  def __init__(self, logdir: str):
    self._file = self._records = None
    if jax.process_index() != 0:
      return
    from etils import epath  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.plugins.scalar import summary_v2  # pylint: disable=g-import-not-at-top
    from tensorboard.summary.writer import record_writer  # pylint: disable=g-import-not-at-top
    self._event, self._scalar = event_pb2.Event, summary_v2.scalar_pb
    path = epath.Path(logdir)
    path.mkdir(parents=True, exist_ok=True)
    name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.v2'
    self._file = (path / name).open('wb')
    self._records = record_writer.RecordWriter(self._file)
    self._write(self._event(wall_time=time.time(), file_version='brain.Event:2'))
    self._flushed = time.monotonic()

  def _write(self, event) -> None:
    self._records.write(event.SerializeToString())

  def scalars(self, step: int, values: dict) -> None:
    if self._records is None:
      return
    now = time.time()
    for name, value in values.items():
      self._write(self._event(wall_time=now, step=int(step),
                              summary=self._scalar(name, float(value))))
    if time.monotonic() - self._flushed > self.FLUSH_SECONDS:
      self.flush()

  def flush(self) -> None:
    if self._records is not None:
      self._records.flush()
      self._flushed = time.monotonic()

  def close(self, quiet: bool = False) -> None:
    """Flushes and closes the event file.

    With ``quiet`` (the run is already failing, e.g. on a full disk) an
    error from the last flush is printed as one line, not raised, so the
    run's own error is the one the user sees.
    """
    if self._records is None:
      return
    try:
      self._records.close()
    except OSError as e:
      if not quiet:
        raise
      say(f'TensorBoard events could not be flushed ({e.strerror or e}); the '
          'event file keeps what was written before.')
    finally:
      self._file = self._records = None


def last_logged_step(logdir: str) -> int:
  """The highest step of any summary in ``logdir``'s event files (0 if none).

  Reads the records directly (no TensorFlow); a record cut short by a
  killed writer ends that file's reading.
  """
  import struct  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  root, last = epath.Path(logdir), 0
  if not root.is_dir():
    return 0
  for path in root.glob('events.out.tfevents.*'):
    data, at = path.read_bytes(), 0
    while at + 12 <= len(data):
      (length,) = struct.unpack_from('<Q', data, at)
      record = data[at + 12:at + 12 + length]
      if len(record) < length:
        break
      at += 12 + length + 4
      try:
        event = event_pb2.Event.FromString(record)
      except Exception:  # pylint: disable=broad-except
        break  # A torn record.
      if event.HasField('summary'):
        last = max(last, event.step)
  return last


def say(message: str) -> None:
  """Prints a line for the user, from process 0 only."""
  if jax.process_index() == 0:
    print(message, flush=True)
