"""GPT-2-style decoder on the embedded corpus: LayerNorm, learned positions, GELU.

    python -m llm_jax.train --config=configs/gpt2_style.py

The same size and budget as configs/base.py with GPT-2's architecture choices
(biases, tied input/output embeddings). Expected on 2 CPU cores: about 10
minutes, validation loss within a few hundredths of base.py's.
"""

from llm_jax.configuration import base_config


def get_config():
  c = base_config()
  c.name = 'gpt2_style'
  c.model.norm = 'layernorm'
  c.model.position = 'learned'
  c.model.mlp = 'gelu'
  c.model.num_kv_heads = 4
  c.model.mlp_dim = 1024
  c.model.use_bias = True
  c.model.tie_embeddings = True
  c.model.norm_eps = 1e-5
  return c
