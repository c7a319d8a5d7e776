"""Extractive question answering (SQuAD v1.1 / v2.0): an encoder with a span head.

    python -m llm_jax.convert import --hf_dir=bert-base-uncased --workdir=runs/bert
    python -m llm_jax.train --config=configs/qa.py:runs/bert \
        --config.task.train_path=train-v2.0.json --config.task.val_path=dev-v2.0.json
    python -m llm_jax.evaluate --workdir=runs/qa --task_data=dev-v2.0.json

The files are SQuAD JSON, the official format. Each question and its context
become windows of data.seq_len tokens ([CLS] question [SEP] context [SEP]),
task.doc_stride tokens apart for a long context; the head scores every token
as the answer's start and end, and the best span of at most
task.max_answer_len tokens wins (no answer, in v2.0, when [CLS] beats it by
more than task.null_threshold). Scores are the official exact match and F1.
After the colon: an encoder run (an imported BERT or RoBERTa, or an MLM run)
whose body and tokenizer are used; the span head starts fresh. Without one, a
small BERT-style encoder and a WordPiece tokenizer are trained from scratch on
the task's texts. BERT's SQuAD recipe: stride 128, peak 3e-5 (from scratch
1e-3), 2 epochs; windows are the source's context (512 for BERT-base: its
learned position table fixes it).

Should reach: for BERT-base on SQuAD v1.1, about 81 exact match / 88 F1 (as
published; not measured here: no accelerator). On the generated SQuAD v2 set
of tests/test_encoder_tasks.py (who lives where, a quarter unanswerable) the
from-scratch model reaches exact match and F1 far above answering the first
fact's city (docs/encoders.md has the figures).
"""

from llm_jax.core.configuration import base_config, use_bert_architecture
from llm_jax.runs.init_from import config_from


def get_config(init_from: str = ''):
  c = config_from(init_from, base_config())
  c.name = 'qa'
  if not init_from:  # A small BERT-style encoder and WordPiece vocabulary, trained here.
    use_bert_architecture(c)
    m = c.model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = 2, 128, 4, 4, 32
    m.mlp_dim = 512
    c.tokenizer.kind, c.tokenizer.vocab_size = 'wordpiece', 4096
    c.data.seq_len = 128
    c.optim.learning_rate = 1e-3
  else:
    c.optim.learning_rate = 3e-5  # Windows: the source's context (a learned table).
  c.model.head = 'qa'
  c.task.doc_stride = 128
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.01
  c.optim.min_lr_ratio = 0.0
  c.train.steps = 2000
  c.train.batch_size = 32
  c.train.eval_every = 500
  c.train.num_samples = 0
  c.checkpoint.every = 500
  return c
