"""GPT-2 small (124M parameters): 12 layers, d 768, 12 heads, context 1024.

    python -m llm_jax.train --config=configs/gpt2_124m.py:h100x8 \
        --config.data.source=jsonl --config.data.paths='fineweb/*.jsonl.gz'
    python -m llm_jax.train --config=configs/gpt2_124m.py:v5p-8 --dry_run --topology=v5p:2x2x1

Hardware after the colon: v5p-8, v5p-32, v5e-8, v5e-16, h100x8, cpu (see
HARDWARE in llm_jax/core/configuration.py). The batch is 0.5M tokens (512 x 1024)
as in GPT-2, in 4 micro-batches.
Should reach: roughly 3.3 nats/token validation loss on web text after 10B
tokens (19k steps), by analogy with published GPT-2 124M runs; not yet
measured with llm_jax (no such hardware here). --dry_run checks the fit.
"""

from llm_jax.core.configuration import apply_hardware, base_config, use_gpt2_architecture

# Micro-batches per step that fit each machine (from --dry_run --topology;
# with remat a 1024-token sequence needs about 0.7 GiB on v5p, 1.5 on v5e).
ACCUM = {'v5p-8': 4, 'v5p-32': 1, 'v5e-8': 32, 'v5e-16': 16, 'h100x8': 2, 'cpu': 64}


def get_config(machine: str = 'h100x8'):
  c = base_config()
  c.name = 'gpt2_124m'
  c.tokenizer.vocab_size = 32768
  c.data.seq_len = 1024
  c.model.num_layers = 12
  c.model.d_model = 768
  c.model.num_heads = 12
  c.model.num_kv_heads = 12
  c.model.head_dim = 64
  c.model.mlp_dim = 3072
  use_gpt2_architecture(c)
  c.model.remat = 'full'  # Recompute each block in the backward pass.
  c.model.scan_layers = True  # One block body to compile, whatever the depth.
  c.optim.learning_rate = 6e-4
  c.optim.warmup_steps = 700
  c.train.steps = 19_000
  c.train.batch_size = 512
  c.train.eval_every = 1000
  c.train.eval_batches = 20
  c.checkpoint.every = 1000
  return apply_hardware(c, machine, ACCUM)
