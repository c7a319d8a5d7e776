"""The one place llm_jax imports TensorFlow, with every accelerator hidden from it.

TF serves tf.data, TensorBoard, TFDS and export; JAX owns the GPUs/TPUs. If TF
saw a GPU it would reserve most of its memory before JAX could. So every module
that needs TF does ``from llm_jax.tfhost import tf`` instead of importing it.
"""

import os

# Quiet TF's C++ start-up chatter (oneDNN notices, CUDA probing) before import.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tensorflow as tf  # pylint: disable=g-import-not-at-top

for _kind in ('GPU', 'TPU'):
  try:
    tf.config.set_visible_devices([], _kind)
  except (RuntimeError, ValueError):
    # Already initialised with devices hidden, or no such device type.
    pass

__all__ = ['tf']
