"""RoBERTa from scratch: a byte-level BPE vocabulary and a post-norm encoder, masked LM.

    python -m llm_jax.train --config=configs/roberta.py:h100x8 \
        --config.data.source=jsonl --config.data.paths='corpus/*.jsonl.gz'
    python -m llm_jax.fill_mask --workdir=runs/roberta --text='The capital of France is <mask>.'
    python -m llm_jax.convert export --workdir=runs/roberta --out=hf/roberta

configs/mlm.py's sizes (6 layers, d 768, 512-token windows, RoBERTa's
optimizer) with RoBERTa's own choices: a 52k byte-level BPE tokenizer trained
on the corpus (<s> <pad> </s> <unk> <mask>; lossless on any text, code too),
post-norm blocks, exact GELU, a learned table read past the padding offset
(2), one token type, LayerNorm epsilon 1e-5 and BERT's masked-LM head. The
export is a RobertaForMaskedLM that transformers loads with its tokenizer
(tokenizer.json). Hardware after the colon as in configs/gpt2_124m.py.

Should reach: masked-token accuracy well above the unigram baseline within
the first thousand steps (not measured at this size: no accelerator here).
On CPU, try the shape with --config.model.num_layers=2
--config.tokenizer.vocab_size=4096 --config.train.steps=50
--config.train.batch_size=8 (:cpu); tests/test_encoder_tasks.py trains a
2-layer one on the embedded corpus and fills <mask> with it.
"""

from llm_jax.core.configuration import (CONFIGS_DIR, apply_hardware, load_preset,
                                        use_bert_architecture)

ACCUM = {'v5p-8': 1, 'v5p-32': 1, 'v5e-8': 8, 'v5e-16': 4, 'h100x8': 1, 'cpu': 32}


def get_config(machine: str = 'h100x8'):
  c = load_preset(CONFIGS_DIR / 'mlm.py')
  c.name = 'roberta'
  use_bert_architecture(c)
  c.model.type_vocab_size, c.model.position_offset = 1, 2
  c.model.norm_eps, c.model.mlm_head = 1e-5, True
  c.tokenizer.kind, c.tokenizer.vocab_size = 'bytelevel_bpe', 52_000
  return apply_hardware(c, machine, ACCUM)
