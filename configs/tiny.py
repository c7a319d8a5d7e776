"""Tiny preset: a smoke test of the whole pipeline in under a minute on CPU.

    python -m llm_jax.train --config=configs/tiny.py

Trains a 1k-vocabulary tokenizer on 300 standard-library files and a 2-layer
model for 60 steps. Expected: validation loss falls from ln(1024) = 6.9 to
about 5.2 (13 s on 2 CPU cores). The tests use this preset with fewer steps.
"""

from llm_jax.core.configuration import base_config


def get_config():
  c = base_config()
  c.name = 'tiny'
  c.data.max_documents = 300
  c.data.seq_len = 64
  c.tokenizer.vocab_size = 1024
  c.model.num_layers = 2
  c.model.d_model = 64
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 16
  c.model.mlp_dim = 192
  c.model.dtype = 'float32'
  c.optim.warmup_steps = 10
  c.train.steps = 60
  c.train.batch_size = 8
  c.train.log_every = 10
  c.train.eval_every = 30
  c.train.eval_batches = 4
  c.train.sample_tokens = 16
  c.checkpoint.every = 30
  return c
