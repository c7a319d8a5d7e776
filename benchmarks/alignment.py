"""The figures of docs/alignment.md: SFT, a reward model, DPO, ORPO and GRPO on one task.

    python benchmarks/alignment.py [--out=/tmp/alignment] [--memory]

The task (tests/colours.py): "What color is the cup? It is blue." is answered
"The cup is blue.". The tiny model (configs/tiny.py, 230k parameters) is
SFT'd on answers of which 40% name the wrong colour, so it prefers the right
one only somewhat; then each alignment objective starts from that run:

* a reward model on 300 pairs (the stated colour over the wrong one);
* DPO (full, and LoRA rank 8 with the base as reference) and ORPO on them;
* GRPO with an exact-match reward on 300 prompts, and with the reward model.

Held-out pairs (64, other seeds) and held-out prompts measure each run.
``--memory`` also compiles the DPO step of configs/base.py with a frozen
reference copy and with LoRA and prints the compiled peak memory.
Everything runs on this machine's CPU; the last table is what the docs quote.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
sys.path.insert(0, ROOT)

import colours  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from llm_jax import train  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from llm_jax.core import configuration  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from llm_jax.data import shards  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from llm_jax.evaluation import pairs  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from llm_jax.runs import init_from, workdir  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

REWARD_FN = os.path.join(ROOT, 'tests', 'colours.py') + ':exact_answer'


def _sft(out: str) -> str:
  tiny = configuration.load_preset('tiny')
  tiny.data.update(cache_dir=os.path.join(out, 'cache'), max_documents=120)
  tokenizer = shards.prepare(tiny, log=lambda *_: None).tokenizer
  c = configuration.load_preset('sft')
  c.model = tiny.model
  c.data.update(paths=colours.write_sft(os.path.join(out, 'sft.jsonl'), n=400, noise=0.4),
                seq_len=64, val_fraction=0.1, cache_dir=tiny.data.cache_dir)
  c.tokenizer.path = tokenizer.path
  c.optim.update(learning_rate=3e-3, warmup_steps=5)
  c.train.update(steps=150, batch_size=16, eval_every=0, eval_batches=4, num_samples=0)
  c.checkpoint.every = 150
  return _run(c, os.path.join(out, 'sft'))['workdir']


def _preset(name: str, sft: str, out: str, **train_kw):
  c = init_from.config_from(sft, configuration.load_preset(
      configuration.CONFIGS_DIR / f'{name}.py'), with_template=True)
  c.data.cache_dir = os.path.join(out, 'cache')
  c.train.update(num_samples=0, **train_kw)
  c.checkpoint.every = c.train.steps
  return c


def _run(config, workdir: str) -> dict:
  t0 = time.perf_counter()
  result = train.run(config, workdir)
  result['seconds'] = time.perf_counter() - t0
  return result


def _held_out(run_dir: str, heldout: str) -> dict:
  return pairs.evaluate_preferences(workdir.load(run_dir), heldout, log=lambda *_: None)


def _pair_runs(sft: str, out: str, prefs: str, heldout: str, rows: list) -> str:
  """Reward model, DPO (full and LoRA) and ORPO; returns the reward model's dir."""
  c = _preset('reward', sft, out, steps=80, batch_size=16, eval_every=20, eval_batches=8)
  c.data.paths = prefs
  c.optim.update(learning_rate=1e-3, warmup_steps=5)
  r = _run(c, os.path.join(out, 'rm'))
  h = _held_out(r['workdir'], heldout)
  hist = {s: round(v, 3) for s, v in r['val_history'].items()}
  rows.append(('reward model', f'{c.train.steps} x {c.train.batch_size} pairs',
               f'val loss {hist}, val accuracy {r["val_accuracy"]:.2f}; held-out '
               f'accuracy {h["reward_accuracy"]:.2f}, '
               f'margin {h["reward_margin"]:.2f}', r['seconds']))
  for name, objective, rank, lr in (('dpo', 'dpo', 0, 5e-4), ('dpo-lora', 'dpo', 8, 5e-3),
                                    ('orpo', 'orpo', 0, 5e-4)):
    c = _preset('dpo', sft, out, steps=50, batch_size=16, eval_every=50, eval_batches=8)
    c.objective, c.lora.rank, c.data.paths = objective, rank, prefs
    c.optim.update(learning_rate=lr, warmup_steps=5)
    r = _run(c, os.path.join(out, name))
    h = _held_out(r['workdir'], heldout)
    rows.append((name, f'{c.train.steps} x {c.train.batch_size} pairs, lr {lr:g}',
                 f'held-out logp accuracy {h["logp_accuracy"]:.2f}, margin '
                 f'{h["logp_margin"]:.2f} nats, chosen logp {h["logp_chosen"]:.2f}; '
                 f'reward accuracy {h["reward_accuracy"]:.2f}, margin '
                 f'{h["reward_margin"]:.3f}; step 0 val loss {r["val_history"][0]:.4f}',
                 r['seconds']))
  return os.path.join(out, 'rm')


def _grpo_runs(sft: str, out: str, rm: str, rows: list) -> None:
  prompts = colours.write_prompts(os.path.join(out, 'prompts.jsonl'), n=300)
  for name, reward, reward_model, steps in (('grpo exact match', REWARD_FN, '', 30),
                                            ('grpo reward model', '', rm, 20)):
    c = _preset('grpo', sft, out, steps=steps, batch_size=64, eval_every=10, log_every=10)
    c.data.update(paths=prompts, val_fraction=0.25)
    c.rl.update(reward=reward, reward_model=reward_model, num_generations=8,
                max_new_tokens=12)
    c.optim.update(learning_rate=1e-3, warmup_steps=3)
    r = _run(c, os.path.join(out, name.replace(' ', '-')))
    hist = {s: round(v, 3) for s, v in r['val_history'].items()}
    rows.append((name, f'{steps} x 8 prompts x 8 completions',
                 f'held-out greedy reward {hist} ({r["val_prompts"]} prompts)',
                 r['seconds']))


def _memory(rows: list) -> None:
  from llm_jax.training import aot  # pylint: disable=g-import-not-at-top
  for rank in (0, 8):
    c = configuration.load_preset(configuration.CONFIGS_DIR / 'dpo.py')
    c.lora.rank = rank
    r = aot.dry_run(c)
    rows.append((f'DPO step, configs/base.py, {"LoRA 8" if rank else "frozen copy"}',
                 '16 pairs x 256', f'compiled peak {r["peak_bytes"] / 2**30:.3f} GiB '
                 f'(reference copy {r["reference_bytes"] / 2**20:.1f} MiB, optimizer '
                 f'state {r["opt_state_bytes"] / 2**20:.1f} MiB)', 0.0))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='/tmp/alignment')
  parser.add_argument('--memory', action='store_true')
  args = parser.parse_args()
  rows = []
  if args.memory:
    _memory(rows)
  sft = _sft(args.out)
  prefs = colours.write_pairs(os.path.join(args.out, 'pairs.jsonl'), n=300)
  heldout = colours.write_pairs(os.path.join(args.out, 'heldout.jsonl'), n=64, seed=7)
  h = _held_out(sft, heldout)
  rows.append(('SFT start', '150 x 16', f'held-out logp accuracy {h["logp_accuracy"]:.2f}, '
               f'margin {h["logp_margin"]:.2f} nats, chosen logp {h["logp_chosen"]:.2f}', 0.0))
  rm = _pair_runs(sft, args.out, prefs, heldout, rows)
  _grpo_runs(sft, args.out, rm, rows)
  print('\n| run | steps | result | wall |\n| --- | --- | --- | --- |')
  for name, steps, result, seconds in rows:
    print(f'| {name} | {steps} | {result} | {seconds:.0f} s |')


if __name__ == '__main__':
  main()
