"""A RoBERTa-style encoder (about 83M parameters): masked-language modelling.

    python -m llm_jax.train --config=configs/mlm.py:h100x8 \
        --config.data.source=jsonl --config.data.paths='corpus/*.jsonl.gz'
    python -m llm_jax.train --config=configs/mlm.py:v5p-8 --dry_run --topology=v5p:2x2x1
    python -m llm_jax.fill_mask --workdir=runs/mlm --text='The capital of France is <mask>.'

A bidirectional Transformer (model.kind='encoder'): 6 layers, 12 heads,
d 768, MLP 3072, GELU, LayerNorm, learned positions, biases, tied embeddings,
a 52k SentencePiece vocabulary with a <mask> piece, 512-token windows. Each
step masks 15% of the tokens (80% <mask>, 10% random, 10% kept; new masks
every step, a function of (seed, step)) and the loss counts only those.
RoBERTa's optimizer: peak 6e-4, betas (0.9, 0.98), eps 1e-6, decay 0.01;
batch 256 x 512 tokens. Hardware after the colon as in configs/gpt2_124m.py.

Parameters: 82.9M with the 52,000-piece vocabulary (39.9M of them the
embedding table), the size of DistilRoBERTa. Should reach: masked-token
accuracy well above the unigram baseline within the first thousand steps;
not yet measured at this size (no accelerator here). On CPU, try the
shape with --config.model.num_layers=2 --config.tokenizer.vocab_size=4096
--config.train.steps=50 --config.train.batch_size=8 (:cpu).
"""

from llm_jax.core.configuration import apply_hardware, base_config, use_gpt2_architecture

# Micro-batches per step; sized like configs/gpt2_124m.py's (half the
# layers, half the context), to be confirmed with --dry_run --topology.
ACCUM = {'v5p-8': 1, 'v5p-32': 1, 'v5e-8': 8, 'v5e-16': 4, 'h100x8': 1, 'cpu': 32}


def get_config(machine: str = 'h100x8'):
  c = base_config()
  c.name = 'mlm'
  c.tokenizer.vocab_size = 52_000
  c.data.seq_len = 512
  c.model.kind = 'encoder'
  c.model.num_layers = 6
  c.model.d_model = 768
  c.model.num_heads = 12
  c.model.num_kv_heads = 12
  c.model.head_dim = 64
  c.model.mlp_dim = 3072
  use_gpt2_architecture(c)
  c.optim.learning_rate = 6e-4
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  c.optim.weight_decay = 0.01
  c.optim.warmup_steps = 1000
  c.train.steps = 20_000
  c.train.batch_size = 256
  c.train.eval_every = 1000
  c.train.eval_batches = 20
  c.train.num_samples = 0  # An encoder does not continue text.
  c.checkpoint.every = 1000
  return apply_hardware(c, machine, ACCUM)
