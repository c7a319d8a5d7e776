"""GPT-2-style decoder on the embedded corpus: LayerNorm, learned positions, GELU.

    python -m llm_jax.train --config=configs/gpt2_style.py

The same size and budget as configs/base.py with GPT-2's architecture choices
(biases, tied input/output embeddings, a 4x MLP). Should reach a validation
loss close to base.py's in a similar time; not yet measured.
"""

from llm_jax.core.configuration import base_config, use_gpt2_architecture


def get_config():
  c = base_config()
  c.name = 'gpt2_style'
  use_gpt2_architecture(c)
  c.model.num_kv_heads = 4
  c.model.mlp_dim = 512
  return c
