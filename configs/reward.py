"""A reward model on preference pairs, starting from an SFT run.

    python -m llm_jax.train --config=configs/reward.py:runs/sft \
        --config.data.paths='prefs/*.jsonl' --workdir=runs/rm

Each JSONL line is {"prompt": ..., "chosen": ..., "rejected": ...} (strings,
or lists of {"role", "content"} messages; docs/alignment.md). The model,
tokenizer and chat template come from the run after the colon; a scalar head
(fresh) reads the hidden state at each response's last token and the loss is
Bradley-Terry, -log sigmoid(r(chosen) - r(rejected)). The eval reports the
held-out pairs' reward accuracy (chosen scored above rejected) and mean
margin. Expected: accuracy well above 0.5. Measured (docs/alignment.md,
benchmarks/alignment.py, 2 CPU cores): the tiny model SFT'd on colour
questions, 300 pairs where the chosen answer repeats the colour the prompt
states and the rejected one names another: accuracy on 64 held-out pairs
1.00 (margin 4.2) after 80 steps of 16 pairs at lr 1e-3, 72 s.
"""

from llm_jax.core.configuration import base_config
from llm_jax.runs.init_from import config_from


def get_config(init_from: str = ''):
  c = base_config()
  c.objective = 'reward'
  c.data.source = 'preference'
  c.data.val_fraction = 0.1
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 20
  c.optim.weight_decay = 0.0
  c.train.steps = 300
  c.train.eval_every = 100
  c.train.num_samples = 0  # A reward model scores text; it does not write it.
  config = config_from(init_from, c, with_template=True)
  config.name = 'reward'
  return config
