"""Continued pre-training: another run's (or an imported model's) weights, new data.

    python -m llm_jax.convert import --hf_dir=HF_DIR --workdir=runs/imported
    python -m llm_jax.train --config=configs/continued.py:runs/imported \
        --config.data.source=text --config.data.paths='my_corpus/*.txt' \
        --workdir=runs/continued

The model section is copied from the source's config.json (so the shapes fit)
and ``init_from`` points at it: parameters come from its newest checkpoint (or
name a step: runs/x/checkpoints/500), the tokenizer is its tokenizer.model,
and optimizer state, schedule and data are this run's own. The learning rate
is a tenth of pre-training's, as is usual when continuing. A pruned source
(python -m llm_jax.prune) passes on prune.keep_zeros, so this is also the
recovery fine-tuning after pruning (docs/compression.md). Expected: the
validation loss on the new data falls below its value at step 0. Measured
(docs/fine-tuning.md): configs/tiny.py's model, exported,
re-imported and extended by 300 Chinese pieces, on 60 short Chinese documents
with --config.train.steps=60 --config.train.batch_size=8: 8.36 -> 5.91.
"""

from llm_jax.core.configuration import base_config
from llm_jax.runs.init_from import config_from


def get_config(init_from: str = ''):
  c = base_config()
  c.name = 'continued'
  c.optim.learning_rate = 5e-4
  c.optim.warmup_steps = 20
  c.train.steps = 300
  return config_from(init_from, c)
