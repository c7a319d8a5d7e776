"""The one place llm_jax imports TensorFlow, with every accelerator hidden from it.

TF serves TFDS and export (a training run never imports it); JAX owns the
GPUs/TPUs. If TF saw a GPU it would reserve most of its memory before JAX
could. So every module that needs TF does ``from llm_jax.core.tfhost import
tf`` instead of importing it.

TF's native libraries print start-up chatter straight to file descriptor 2
while they load (oneDNN notices, CPU-feature hints, a "failed call to cuInit"
error on a machine without a GPU), whatever ``TF_CPP_MIN_LOG_LEVEL`` says. It
is held back while TF loads and every line that is not such known chatter is
printed afterwards, so real errors still show.
"""

import contextlib
import os
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# Start-up lines of TF's native libraries that say nothing to a user of llm_jax.
_CHATTER = (
    'All log messages before absl::InitializeLog() is called',
    'oneDNN custom operations are on',
    'Could not find cuda drivers on your machine',
    'failed call to cuInit',
    'cpu_feature_guard.cc',
    'To enable the following instructions',
    'rebuild TensorFlow with the appropriate compiler flags',
    'Unable to register cuDNN factory', 'Unable to register cuFFT factory',
    'Unable to register cuBLAS factory', 'computation placer already registered',
    'TF-TRT Warning',
)


@contextlib.contextmanager
def quiet_native_startup():
  """Holds back fd 2 inside the block; re-prints what is not start-up chatter."""
  sys.stderr.flush()
  try:
    saved = os.dup(2)
  except OSError:  # No file descriptor 2 (e.g. some notebook kernels).
    yield
    return
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      for line in held.read().decode('utf-8', 'replace').splitlines(keepends=True):
        if not any(c in line for c in _CHATTER):
          sys.stderr.write(line)
      sys.stderr.flush()


with quiet_native_startup():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for _kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], _kind)
    except (RuntimeError, ValueError):
      # Already initialised with devices hidden, or no such device type.
      pass
  tf.get_logger().setLevel('ERROR')


def import_text():
  """tensorflow_text (the SentencePiece ops of the text signature), quietly."""
  with quiet_native_startup():
    import tensorflow_text  # pylint: disable=g-import-not-at-top
  return tensorflow_text


__all__ = ['tf', 'import_text']
