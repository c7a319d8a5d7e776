"""Instruction tuning (SFT) of a trained or imported model on chat JSONL.

    python -m llm_jax.train --config=configs/sft.py:runs/continued \
        --config.data.paths='my_sft/*.jsonl' --workdir=runs/sft

Each line of the JSONL files is {"prompt": ..., "response": ...} or
{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}.
The model section and tokenizer come from the run after the colon
(init_from); messages are rendered with sft.template, the loss covers only the
assistant's tokens (and the final end-of-text), and several examples are
packed per row without seeing each other. Add --config.lora.rank=8 to train
low-rank adapters only. Expected: the validation loss on held-out responses
falls well below its step-0 value (tests/test_sft.py trains the tiny model
from scratch on templated question/answer pairs: 6.96 -> 1.87 nats per
response token in 40 steps of 8 x 128, 2 cores, 23 s).
"""

from llm_jax.core.configuration import base_config
from llm_jax.runs.init_from import config_from


def get_config(init_from: str = ''):
  c = base_config()
  c.name = 'sft'
  c.data.source = 'sft'
  c.data.val_fraction = 0.05
  c.sft.template = '<|{role}|>\n{content}\n'
  c.sft.pack = True
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 20
  c.optim.weight_decay = 0.0
  c.train.steps = 300
  c.train.eval_every = 100
  c.train.sample_prompts = '<|user|>\nWhat is a list in Python?\n<|assistant|>\n'
  c.train.num_samples = 1
  config = config_from(init_from, c)
  config.name = 'sft'
  return config
