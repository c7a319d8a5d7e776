"""LLaMA 3 8B shapes: 32 layers, d 4096, 32 query / 8 key-value heads, MLP 14336.

    python -m llm_jax.train --config=configs/llama_8b.py:v5p-32 \
        --config.data.source=jsonl --config.data.paths='gs://BUCKET/corpus/*.jsonl.gz'
    python -m llm_jax.train --config=configs/llama_8b.py:v5p-32 --dry_run --topology=v5p:2x2x4

Hardware after the colon: v5p-8, v5p-32, v5e-8, v5e-16, h100x8, cpu (see
HARDWARE in llm_jax/core/configuration.py); parameters and optimizer state are
split over all chips (FSDP). Batch: 1M tokens (512 x 2048) in 32
micro-batches. Should reach: about 2.5 nats/token validation loss on web
text after 100B tokens (100k steps), by analogy with published 8B runs; not
yet measured with llm_jax (no such hardware here). --dry_run checks the fit.
"""

from llm_jax.core.configuration import apply_hardware, base_config

# Micro-batches per step that fit each machine (from --dry_run --topology;
# 1 sequence per chip needs about 25 GiB with remat). v5e's 16 GiB chips do
# not hold an 8B model: --dry_run says so.
ACCUM = {'v5p-8': 128, 'v5p-32': 16, 'v5e-8': 64, 'v5e-16': 32, 'h100x8': 32, 'cpu': 512}


def get_config(machine: str = 'v5p-32'):
  c = base_config()
  c.name = 'llama_8b'
  c.tokenizer.vocab_size = 32768
  c.data.seq_len = 2048
  c.model.num_layers = 32
  c.model.d_model = 4096
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.head_dim = 128
  c.model.mlp_dim = 14336
  c.model.rope_theta = 500_000.0
  c.model.norm_eps = 1e-5
  c.model.remat = 'full'  # Recompute each block in the backward pass.
  c.model.scan_layers = True  # One block body to compile, whatever the depth.
  # Loss over 256 positions at a time: the fp32 [batch, seq, vocab] logits
  # never exist whole.
  c.train.loss_chunk = 256
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 2000
  c.train.steps = 100_000
  c.train.batch_size = 512
  c.train.eval_every = 2000
  c.train.eval_batches = 20
  c.checkpoint.every = 1000
  return apply_hardware(c, machine, ACCUM)
