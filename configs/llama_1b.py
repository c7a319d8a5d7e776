"""LLaMA 3.2 1B shapes: 16 layers, d 2048, 32 query / 8 key-value heads, tied embeddings.

    python -m llm_jax.train --config=configs/llama_1b.py:h100x8 \
        --config.data.source=jsonl --config.data.paths='corpus/*.jsonl.gz'
    python -m llm_jax.train --config=configs/llama_1b.py:v5p-8 --dry_run --topology=v5p:2x2x1

Hardware after the colon: v5p-8, v5p-32, v5e-8, v5e-16, h100x8, cpu (see
HARDWARE in llm_jax/core/configuration.py); parameters and optimizer state are
split over all chips (FSDP). Batch: 1M tokens (512 x 2048) in 8 micro-batches.
Should reach: under 3.0 nats/token validation loss on web text after 20B
tokens (20k steps), by analogy with published 1B runs; not yet measured with
llm_jax (no such hardware here). --dry_run checks the fit.
"""

from llm_jax.core.configuration import apply_hardware, base_config

# Micro-batches per step that fit each machine (from --dry_run --topology;
# with remat a 2048-token sequence needs about 5 GiB on v5p, 13 on v5e).
ACCUM = {'v5p-8': 8, 'v5p-32': 8, 'v5e-8': 64, 'v5e-16': 32, 'h100x8': 8, 'cpu': 512}


def get_config(machine: str = 'h100x8'):
  c = base_config()
  c.name = 'llama_1b'
  c.tokenizer.vocab_size = 32768
  c.data.seq_len = 2048
  c.model.num_layers = 16
  c.model.d_model = 2048
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.head_dim = 64
  c.model.mlp_dim = 8192
  c.model.rope_theta = 500_000.0
  c.model.norm_eps = 1e-5
  c.model.tie_embeddings = True
  c.model.remat = 'full'  # Recompute each block in the backward pass.
  c.model.scan_layers = True  # One block body to compile, whatever the depth.
  # Loss over 256 positions at a time (the fp32 [batch, seq, vocab] logits never
  # exist whole): on v5e-16 the step needs 14.5 GiB per chip instead of 16.7.
  c.train.loss_chunk = 256
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 2000
  c.train.steps = 20_000
  c.train.batch_size = 512
  c.train.eval_every = 1000
  c.train.eval_batches = 20
  c.checkpoint.every = 1000
  return apply_hardware(c, machine, ACCUM)
