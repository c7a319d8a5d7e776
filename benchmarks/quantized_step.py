"""Per-call time of a SavedModel's step signatures: float32 against int8 and int4.

    PYTHONPATH=. python benchmarks/quantized_step.py RUN [--rounds=5] [--calls=40]

Exports RUN five times into a temporary directory (float32; int8 and int4
each with ``--dequantize=once`` and ``every_call``; cpu, ids only) and loads
each with TensorFlow. Then, ROUNDS times, it makes
CALLS calls of each signature below on each export, rotating which export goes
first, and reports the median time of one call:

* ``decode_step`` at batch 1 and 8: one token per row, on a random cache;
  the Go server (``serving/go``) calls it once per generated token;
* ``prefill`` at batch 1: a 32-token prompt;
* ``score`` at batch 8: 64 tokens per row.

The first call of each export is timed apart (it compiles, and a quantized
export with ``once`` fills its float32 copies then; the first export's first
call also pays TensorFlow's start-up). On a shared machine the load drifts,
so the medians of interleaved calls are what compare; the 10th and 90th
percentiles show the spread. Prints a Markdown table.
"""

import os
import statistics
import sys
import tempfile
import time

import numpy as np

from llm_jax.core.tfhost import tf
from llm_jax.deploy import saved_model
from llm_jax.runs import workdir as workdir_lib

# (column, --quantize, --dequantize)
KINDS = (('float32', 'none', 'once'), ('int8', 'int8', 'once'), ('int4', 'int4', 'once'),
         ('int8 every_call', 'int8', 'every_call'), ('int4 every_call', 'int4', 'every_call'))
NAMES = [k[0] for k in KINDS]
# Greedy rows: seed, index, temperature, top_k, top_p per row.
SAMPLING = dict(seed=(np.int32, 0), index=(np.int32, 0), temperature=(np.float32, 0.0),
                top_k=(np.int32, 0), top_p=(np.float32, 1.0))


def _rows(batch: int) -> dict:
  return {k: tf.constant(np.full((batch,), v, dt)) for k, (dt, v) in SAMPLING.items()}


def _calls(sigs, cfg) -> dict:
  """{name: call} over the loaded signatures (inputs made once)."""
  rng = np.random.default_rng(0)
  cache = saved_model.cache_info(cfg)
  out = {}
  for batch in (1, 8):
    shape = [batch, cache['layers'], 2, cache['slots'], cache['kv_heads'], cache['head_dim']]
    args = dict(cache=tf.constant(rng.standard_normal(shape).astype(np.float32)),
                tokens=tf.constant(np.full((batch,), 5, np.int32)),
                positions=tf.constant(np.full((batch,), 40, np.int32)),
                step=tf.constant(np.full((batch,), 3, np.int32)), **_rows(batch))
    out[f'decode_step, batch {batch}'] = (
        lambda args=args: sigs['decode_step'](**args)['token'].numpy())
  prompt = rng.integers(4, cfg.vocab_size, (1, 32)).astype(np.int32)
  out['prefill, batch 1 x 32'] = lambda: sigs['prefill'](
      tokens=tf.constant(prompt), lengths=tf.constant([32]), **_rows(1))['token'].numpy()
  rows = tf.constant(rng.integers(4, cfg.vocab_size, (8, 64)).astype(np.int32))
  out['score, batch 8 x 64'] = lambda: sigs['score'](tokens=rows)['logprobs'].numpy()
  return out


def main(run_dir: str, rounds: int, calls: int) -> None:
  run = workdir_lib.load(run_dir)
  first, engines, info = {}, {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for kind, quantize, dequantize in KINDS:
      out = os.path.join(tmp, kind.replace(' ', '_'))
      info[kind] = saved_model.export(run.workdir, out, quantize=quantize, platforms=('cpu',),
                                      batch_buckets=(1,), stop_ids=(), text_signature=False,
                                      eval_batches=0, dequantize=dequantize,
                                      log=lambda *_: None)
      sigs = tf.saved_model.load(out).signatures
      engines[kind] = _calls(sigs, run.model_cfg)
      t0 = time.perf_counter()
      next(iter(engines[kind].values()))()
      first[kind] = time.perf_counter() - t0
      for call in engines[kind].values():
        call()  # Trace and compile every signature before timing.
    times = {k: {e: [] for e in engines[k]} for k in NAMES}
    for r in range(rounds):
      order = NAMES[r % len(NAMES):] + NAMES[:r % len(NAMES)]
      for engine in engines['float32']:
        for kind in order:
          call = engines[kind][engine]
          for _ in range(calls):
            t0 = time.perf_counter()
            call()
            times[kind][engine].append(time.perf_counter() - t0)
  print(f'{run.model_cfg.num_params():,} parameters; {rounds} rounds x {calls} calls, '
        f'exports rotated; {os.cpu_count()} CPU cores; ms per call, median (p10-p90)\n')
  print('| signature | ' + ' | '.join(NAMES) + ' |')
  print('| --- |' + ' ---: |' * len(NAMES))

  def cell(ts):
    q = np.percentile(ts, [10, 90]) * 1e3
    return f'{statistics.median(ts) * 1e3:.2f} ({q[0]:.1f}-{q[1]:.1f})'

  for engine in engines['float32']:
    print(f'| {engine} | ' + ' | '.join(cell(times[k][engine]) for k in NAMES) + ' |')
  print('| first call (s) | ' + ' | '.join(f'{first[k]:.2f}' for k in NAMES) + ' |')
  for what, key in (('stored', 'param_bytes'), ('held when serving', 'served_param_bytes')):
    print(f'| weights {what} (MiB) | ' + ' | '.join(
        f'{info[k][key] / 2**20:.2f}' for k in NAMES) + ' |')


if __name__ == '__main__':
  flags = dict(a[2:].split('=', 1) for a in sys.argv[1:] if a.startswith('--'))
  args = [a for a in sys.argv[1:] if not a.startswith('--')]
  if len(args) != 1 or set(flags) - {'rounds', 'calls'}:
    sys.exit(__doc__)
  main(args[0], int(flags.get('rounds', 5)), int(flags.get('calls', 40)))
