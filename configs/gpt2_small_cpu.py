"""GPT-2-style model sized for measuring MFU on a CPU: 6 layers, d 512, vocab 8192.

    python -m llm_jax.bench train --config=configs/gpt2_small_cpu.py
    python -m llm_jax.train --config=configs/gpt2_small_cpu.py

The shapes of the CPU measurements in docs/performance.md (batch 8 x 256, fp32): one step is
about 0.3 TFLOP, 2.4 s on 2 shared cores. Should reach, and reached on
2026-11-25 (load average 1.8): `bench train` MFU of 68% of the fp32 matmul
peak sampled after each step (58% against the best peak seen in the run),
about 840 tokens/s (docs/performance.md). Training it on the embedded corpus
is possible but slow (~40 minutes for 1000 steps); configs/base.py is the
preset to train here.
"""

from llm_jax.core.configuration import base_config, use_gpt2_architecture


def get_config():
  c = base_config()
  c.name = 'gpt2_small_cpu'
  c.tokenizer.vocab_size = 8192
  c.data.seq_len = 256
  c.model.num_layers = 6
  c.model.d_model = 512
  c.model.num_heads = 8
  c.model.num_kv_heads = 8
  c.model.head_dim = 64
  c.model.mlp_dim = 2048
  use_gpt2_architecture(c)
  c.model.dtype = 'float32'
  c.optim.learning_rate = 1e-3
  c.train.batch_size = 8
  c.mesh.data = 1  # One device: the host's cores are the unit on CPU.
  return c
