"""A run against its structurally pruned copy: decode and train speed, timed alternately.

    PYTHONPATH=. python benchmarks/pruned_speed.py DENSE_RUN PRUNED_RUN [--rounds=15]

Loads both runs and exports each as a float32 SavedModel (cpu, no stop
tokens, ids only) into a temporary directory. Then, ROUNDS times, it times one
call of each engine for each run, alternating which run goes first:

* JAX decode: ``decode.decode_jit``, greedy, batch 1 and 8, 32-token
  prompts, 64 new tokens;
* SavedModel decode: the same requests through ``serving_default``;
* train step: ``Trainer.step_fn`` of each run's config on random tokens
  (the config's batch, one device).

On a shared machine the load drifts by the second; alternating makes the
median of the per-round ratios (pruned time / dense time) comparable even when
the absolute times are not. Prints a Markdown table (tokens/s from the median
times, and the median paired speed-up).
"""

import os
import statistics
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np

from llm_jax.core.tfhost import tf
from llm_jax.deploy import saved_model
from llm_jax.inference import decode
from llm_jax.perf import measure
from llm_jax.runs import workdir as workdir_lib

PROMPT, NEW = 32, 64


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def _engines(run, export_dir):
  """{engine name: (call, tokens per call)} for one run, each compiled once."""
  sig = tf.saved_model.load(export_dir).signatures['serving_default']
  rng = np.random.default_rng(0)
  out = {}
  for batch in (1, 8):
    tokens = rng.integers(4, run.model_cfg.vocab_size, (batch, PROMPT)).astype(np.int32)
    lengths = np.full((batch,), PROMPT, np.int32)

    def jax_call(tokens=tokens, lengths=lengths):
      jax.block_until_ready(decode.decode_jit(
          run.params, tokens, lengths, np.int32(NEW), np.float32(0), np.int32(0),
          np.float32(1), np.int32(0), graphdef=run.graphdef, width=NEW, stop_ids=(),
          pad_id=0))

    def tf_call(tokens=tokens, lengths=lengths):
      sig(tokens=tf.constant(tokens), lengths=tf.constant(lengths),
          max_new_tokens=tf.constant(NEW), temperature=tf.constant(0.0),
          top_k=tf.constant(0), top_p=tf.constant(1.0), seed=tf.constant(0))['tokens'].numpy()

    out[f'JAX decode, batch {batch}'] = (jax_call, batch * NEW)
    out[f'SavedModel decode, batch {batch}'] = (tf_call, batch * NEW)
  config = ml_collections.ConfigDict(run.config.to_dict())
  config.mesh.data = config.mesh.fsdp = config.mesh.tensor = 1
  config.tokenizer.vocab_size = run.model_cfg.vocab_size
  tr = measure.build_trainer(config)
  holder = {'state': tr.init_fn()}
  batch = measure.random_batch(tr, config)

  def train_call():
    holder['state'], metrics = tr.step_fn(holder['state'], batch)
    jax.block_until_ready(metrics)

  out['train step'] = (train_call, config.train.batch_size * config.data.seq_len)
  for call, _ in out.values():
    call()  # Compile (and warm up) before any timing.
  return out


def main(dense_dir: str, pruned_dir: str, rounds: int) -> None:
  runs = {'dense': workdir_lib.load(dense_dir), 'pruned': workdir_lib.load(pruned_dir)}
  with tempfile.TemporaryDirectory() as tmp:
    engines = {}
    for name, run in runs.items():
      out = os.path.join(tmp, name)
      saved_model.export(run.workdir, out, max_new_tokens=NEW, platforms=('cpu',),
                         batch_buckets=(1,), stop_ids=(), text_signature=False,
                         log=lambda *_: None)
      engines[name] = _engines(run, out)
    times = {name: {e: [] for e in engines[name]} for name in runs}
    for r in range(rounds):
      for engine in engines['dense']:
        for name in (('dense', 'pruned') if r % 2 == 0 else ('pruned', 'dense')):
          times[name][engine].append(_timed(engines[name][engine][0]))
  cfg = {n: r.model_cfg for n, r in runs.items()}
  print(f'dense: {cfg["dense"].num_params():,} parameters (mlp_dim {cfg["dense"].mlp_dim}, '
        f'{cfg["dense"].num_heads} heads); pruned: {cfg["pruned"].num_params():,} '
        f'(mlp_dim {cfg["pruned"].mlp_dim}, {cfg["pruned"].num_heads} heads); '
        f'{rounds} alternating rounds; {os.cpu_count()} CPU cores\n')
  print('| engine | dense tokens/s | pruned tokens/s | speed-up (median of paired ratios) |')
  print('| --- | ---: | ---: | ---: |')
  for engine, (_, tokens) in engines['dense'].items():
    d, p = times['dense'][engine], times['pruned'][engine]
    ratio = statistics.median(a / b for a, b in zip(d, p))
    print(f'| {engine} | {tokens / statistics.median(d):,.0f} | '
          f'{tokens / statistics.median(p):,.0f} | {ratio:.3f}x |')


if __name__ == '__main__':
  args = [a for a in sys.argv[1:] if not a.startswith('--rounds=')]
  rounds = next((int(a.split('=')[1]) for a in sys.argv[1:] if a.startswith('--rounds=')), 15)
  if len(args) != 2:
    sys.exit(__doc__)
  main(*args, rounds)
