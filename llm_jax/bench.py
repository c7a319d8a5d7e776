r"""Benchmarks you can rerun: ``python -m llm_jax.bench SUBCOMMAND --config=FILE``.

Subcommands (each prints a Markdown table and, with ``--out=FILE``, writes the
same figures as JSON):

  train       compile time, steady-state step time (median of ``--steps``
              steps after ``--warmup``, each blocked on), tokens/s, MFU and
              peak memory of the real train step on random tokens.
  data        batches/s of the tf.data input pipeline against the batches/s a
              train step consumes (prepares the config's data first).
  checkpoint  save and restore bytes/s of the train state, and how long an
              async save holds the loop against the step time.
  decode      generation tokens/s, prefill and per-token latency
              (``llm_jax/bench_decode.py``).

MFU follows the PaLM convention (``metrics.train_flops_per_token``: 6N for the
matmul parameters plus 12 * layers * heads * head_dim * seq for attention). On
CPU the peak is a 2048^3 matmul in the model's compute dtype measured in the
same run, before and after the steps; the higher of the two is used, so drift
of a shared machine cannot flatter the figure. On TPU/GPU the data-sheet bf16
peak (``metrics.PEAK_FLOPS_BY_KIND``) or ``--config.train.peak_flops``.

Examples:
  python -m llm_jax.bench train --config=configs/gpt2_small_cpu.py
  python -m llm_jax.bench train --config=configs/base.py --config.model.dtype=bfloat16
  python -m llm_jax.bench data --config=configs/base.py --out=/tmp/data.json
  python -m llm_jax.bench checkpoint --config=configs/base.py
"""

import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

from absl import app, flags, logging

from llm_jax import cli
from llm_jax.errors import UserError

SUBCOMMANDS = ('train', 'data', 'checkpoint', 'decode')

_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps (train, checkpoint) or '
                              'batches (data) after the warm-up.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps after the compile.')
_OUT = flags.DEFINE_string('out', '', 'Also write the figures as JSON to this file.')
_SAVE_EVERY = flags.DEFINE_integer('save_every', 5, 'checkpoint: steps between '
                                   'async saves in the timed loop.')
_DIR = flags.DEFINE_string('dir', '', 'checkpoint: where to write (default a '
                           'temporary directory, removed afterwards).')

GIB = 2**30


# ---- Shared helpers.


def _build(config):
  """The Trainer of ``config`` on all local devices (vocab from the tokenizer config)."""
  from llm_jax import sharding, trainer  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config.mesh)
  return trainer.Trainer.build(config, config.tokenizer.vocab_size, mesh)


def _random_batch(tr, config, seed: int = 0) -> dict:
  """Uniform random tokens in the batch contract's shapes, placed on the mesh."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from llm_jax import sharding  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  shape = (config.train.batch_size, config.data.seq_len)
  local = {k: rng.integers(0, tr.model_cfg.vocab_size, shape, dtype=np.int32)
           for k in ('inputs', 'targets')}
  del jax
  return sharding.global_batch(local, tr.batch_sharding)


def _cpu_peak(dtype: str) -> float:
  """FLOP/s of a 2048^3 matmul in ``dtype`` on this host (best of 5)."""
  from llm_jax import metrics  # pylint: disable=g-import-not-at-top
  return metrics.measure_cpu_matmul_peak(dtype=dtype)


def _cpu_peak_sample(dtype: str) -> float:
  """One quick sample of the matmul peak (best of 2), between two steps."""
  from llm_jax import metrics  # pylint: disable=g-import-not-at-top
  return metrics.measure_cpu_matmul_peak(repeats=2, dtype=dtype)


def _peak_rss_bytes() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def _device_peak_bytes() -> float | None:
  """Peak bytes in use on the first device, where the runtime reports it."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  return float(stats['peak_bytes_in_use']) if 'peak_bytes_in_use' in stats else None


def time_steps(step_fn, state, batch, *, warmup: int, steps: int, probe=None):
  """Runs ``warmup`` then ``steps`` steps, blocking on each.

  ``probe``, if given, is called after every timed step (e.g. to sample the
  matmul peak under the same machine load); its results come back too.

  Returns:
    ``(state, step times in seconds, probe results)``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  for _ in range(warmup):
    state, m = step_fn(state, batch)
    jax.block_until_ready((state, m))
  times, probes = [], []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = step_fn(state, batch)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
    if probe is not None:
      probes.append(probe())
  return state, times, probes


def _table(rows: list[tuple[str, str]]) -> str:
  width = max(len(k) for k, _ in rows)
  lines = [f'| {"metric":<{width}} | value |', f'|{"-" * (width + 2)}|-------|']
  lines += [f'| {k:<{width}} | {v} |' for k, v in rows]
  return '\n'.join(lines)


def _machine() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()
  cpu = ''
  if dev[0].platform == 'cpu':
    cpu = f', {os.cpu_count()} host cores'
  return f'{len(dev)} x {dev[0].device_kind} ({dev[0].platform}){cpu}'


# ---- train


def bench_train(config, *, steps: int, warmup: int) -> tuple[dict, list]:
  """Compiles and times the real train step; returns (figures, table rows)."""
  import jax  # pylint: disable=g-import-not-at-top
  from llm_jax import metrics  # pylint: disable=g-import-not-at-top
  tr = _build(config)
  cfg, seq, batch_size = tr.model_cfg, config.data.seq_len, config.train.batch_size
  measure_peak = jax.devices()[0].platform == 'cpu' and not config.train.peak_flops
  peak_before = _cpu_peak(cfg.dtype) if measure_peak else None
  state = tr.init_fn()
  batch = _random_batch(tr, config)
  t0 = time.perf_counter()
  lowered = tr.step_fn.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  # On CPU the peak is sampled after every step: a shared machine's load
  # changes by the second, and each step is compared with the matmul rate of
  # its own moment.
  probe = (lambda: _cpu_peak_sample(cfg.dtype)) if measure_peak else None
  state, times, peaks = time_steps(compiled, state, batch, warmup=warmup,
                                   steps=steps, probe=probe)
  median = statistics.median(times)
  tokens = batch_size * seq
  flops_tok = metrics.train_flops_per_token(cfg, seq)
  tps = tokens / median
  if measure_peak:
    peak_after = _cpu_peak(cfg.dtype)
    peak = statistics.median(peaks)
    best_peak = max(peaks + [peak_before, peak_after])
    mfu = statistics.median(tokens * flops_tok / t / p for t, p in zip(times, peaks))
    peak_src = (f'{cfg.dtype} 2048^3 jnp.dot measured in this run after every '
                f'step (median; {min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f}), '
                f'{peak_before / 1e9:.0f} before and {peak_after / 1e9:.0f} after')
  else:
    peak, peak_src = metrics.peak_flops(config.train.peak_flops)
    peak_after, best_peak, mfu = None, peak, tps * flops_tok / peak
  device_peak = _device_peak_bytes()
  r = {
      'command': 'train', 'config': config.name, 'machine': _machine(),
      'parameters': cfg.num_params(), 'matmul_parameters': metrics.matmul_params(cfg),
      'batch': batch_size, 'seq_len': seq, 'dtype': cfg.dtype,
      'remat': cfg.remat, 'scan_layers': bool(config.model.scan_layers),
      'attention': config.model.attention, 'loss_chunk': config.train.loss_chunk,
      'lower_seconds': t1 - t0, 'compile_seconds': t2 - t1,
      'step_seconds_median': median, 'step_seconds_min': min(times),
      'step_seconds_max': max(times), 'steps_timed': len(times),
      'tokens_per_sec': tps, 'flops_per_token': flops_tok,
      'flop_convention': 'PaLM: 6 * matmul params + 12 * layers * heads * '
                         'head_dim * seq (causal mask not discounted)',
      'model_tflops_per_sec': tps * flops_tok / 1e12,
      'peak_flops': peak, 'peak_source': peak_src,
      'peak_flops_before': peak_before, 'peak_flops_after': peak_after,
      'peak_flops_samples': peaks, 'step_seconds': times,
      'mfu': mfu, 'mfu_definition': 'median over steps of (step FLOPs / step '
             'time) / (peak sampled right after that step)',
      'mfu_vs_best_peak': tps * flops_tok / best_peak, 'best_peak_flops': best_peak,
      'compiled_temp_bytes': mem.temp_size_in_bytes if mem else None,
      'compiled_argument_bytes': mem.argument_size_in_bytes if mem else None,
      'peak_device_bytes': device_peak, 'peak_rss_bytes': _peak_rss_bytes(),
  }
  mem_row = (f'{device_peak / GIB:.2f} GiB (device peak in use)' if device_peak
             else f'{r["peak_rss_bytes"] / GIB:.2f} GiB (peak RSS of this process)')
  rows = [
      ('config', f'{config.name}: {cfg.num_layers} layers, d {cfg.d_model}, '
                 f'vocab {cfg.vocab_size}, {r["parameters"] / 1e6:.1f}M params'),
      ('batch x seq', f'{batch_size} x {seq} ({cfg.dtype}, remat {cfg.remat}, '
                      f'scan {r["scan_layers"]}, attention {r["attention"]}, '
                      f'loss_chunk {r["loss_chunk"]})'),
      ('machine', r['machine']),
      ('compile (lower + compile)', f'{t1 - t0:.2f} s + {t2 - t1:.2f} s'),
      ('step time (median of %d)' % len(times),
       f'{1000 * median:.1f} ms (min {1000 * min(times):.1f}, max {1000 * max(times):.1f})'),
      ('tokens/s', f'{tps:,.0f}'),
      ('FLOPs/token (PaLM 6N + attention)', f'{flops_tok / 1e6:.1f} M'),
      ('achieved', f'{tps * flops_tok / 1e9:.1f} GFLOP/s'),
      ('peak', f'{peak / 1e9:.1f} GFLOP/s ({peak_src})'),
      ('**MFU**', f'**{100 * r["mfu"]:.1f}%**'),
      ('MFU vs the best peak seen', f'{100 * r["mfu_vs_best_peak"]:.1f}% '
                                    f'({best_peak / 1e9:.0f} GFLOP/s)'),
      ('compiled temporaries', f'{r["compiled_temp_bytes"] / GIB:.3f} GiB'
       if r['compiled_temp_bytes'] is not None else '?'),
      ('peak memory', mem_row),
  ]
  return r, rows


# ---- data


def bench_data(config, *, steps: int, warmup: int) -> tuple[dict, list]:
  """Batches/s the tf.data pipeline delivers against what a train step takes."""
  import jax  # pylint: disable=g-import-not-at-top
  from llm_jax import metrics  # pylint: disable=g-import-not-at-top
  from llm_jax.data import pipeline, shards  # pylint: disable=g-import-not-at-top
  data = shards.prepare(config, log=metrics.say)
  windows = pipeline.TokenWindows(data.train_shards, data.manifest['dtype'],
                                  config.data.seq_len)
  batch_size = config.train.batch_size
  batches = pipeline.train_batches(
      windows, global_batch=batch_size, seed=config.seed, start_step=0,
      process_index=jax.process_index(), process_count=jax.process_count())
  n = max(steps, 1) * 10  # Many batches: each takes well under a millisecond.
  for _ in range(max(warmup, 1)):
    next(batches)
  t0 = time.perf_counter()
  for _ in range(n):
    next(batches)
  pipe_s = (time.perf_counter() - t0) / n
  # What a step consumes: the same train step as `bench train`, on this vocab.
  config.tokenizer.vocab_size = data.vocab_size
  tr = _build(config)
  state = tr.init_fn()
  batch = _random_batch(tr, config)
  _, times, _ = time_steps(tr.step_fn, state, batch, warmup=max(warmup, 1),
                        steps=max(steps // 4, 3))
  step_s = statistics.median(times)
  r = {'command': 'data', 'config': config.name, 'machine': _machine(),
       'batch': batch_size, 'seq_len': config.data.seq_len,
       'batches_timed': n, 'pipeline_batches_per_sec': 1 / pipe_s,
       'pipeline_tokens_per_sec': batch_size * config.data.seq_len / pipe_s,
       'step_seconds_median': step_s, 'train_batches_per_sec': 1 / step_s,
       'headroom': step_s / pipe_s}
  rows = [
      ('config', f'{config.name}: batch {batch_size} x {config.data.seq_len}'),
      ('machine', r['machine']),
      ('pipeline (tf.data, %d batches)' % n,
       f'{r["pipeline_batches_per_sec"]:,.1f} batches/s '
       f'({r["pipeline_tokens_per_sec"]:,.0f} tokens/s)'),
      ('train step consumes', f'{r["train_batches_per_sec"]:,.2f} batches/s '
                              f'({1000 * step_s:.1f} ms/step)'),
      ('**headroom**', f'**{r["headroom"]:,.0f}x**'),
  ]
  return r, rows


# ---- checkpoint


def _tree_bytes(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def bench_checkpoint(config, *, steps: int, warmup: int) -> tuple[dict, list]:
  """Save/restore bytes/s of the whole train state; async-save blocking time."""
  import jax  # pylint: disable=g-import-not-at-top
  from llm_jax import checkpoint  # pylint: disable=g-import-not-at-top
  tr = _build(config)
  state = tr.init_fn()
  batch = _random_batch(tr, config)
  state, times, _ = time_steps(tr.step_fn, state, batch, warmup=max(warmup, 1),
                            steps=max(min(steps, 10), 3))
  step_s = statistics.median(times)
  nbytes = _tree_bytes(state)
  own_dir = not _DIR.value
  root = _DIR.value or tempfile.mkdtemp(prefix='llm_jax_bench_ckpt_')
  try:
    ckpt = checkpoint.Checkpointer(os.path.join(root, 'checkpoints'), every=0,
                                   keep=2)
    meta = {'bench': True}
    # Synchronous figures: the whole save (queue + write + commit) and restore.
    t0 = time.perf_counter()
    ckpt.save(1, state, meta)
    ckpt.wait()
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    restored = ckpt.restore(1, tr.abstract_state())
    jax.block_until_ready(restored)
    restore_s = time.perf_counter() - t0
    del restored
    # The loop as train.py runs it: step, and every few steps an async save.
    blocks, loop_times = [], []
    every = max(_SAVE_EVERY.value, 1)
    for i in range(max(steps, every)):
      t0 = time.perf_counter()
      state, m = tr.step_fn(state, batch)
      if (i + 1) % every == 0:
        # The step's own compute is not the save's: wait for it, then time
        # what save() holds (directories, metadata, device-to-host copy).
        jax.block_until_ready(state)
        tb = time.perf_counter()
        ckpt.save(2 + i, state, meta)
        blocks.append(time.perf_counter() - tb)
      jax.block_until_ready(m)
      loop_times.append(time.perf_counter() - t0)
    ckpt.close()
  finally:
    if own_dir:
      shutil.rmtree(root, ignore_errors=True)
  block = statistics.median(blocks)
  r = {'command': 'checkpoint', 'config': config.name, 'machine': _machine(),
       'state_bytes': nbytes, 'save_seconds': save_s, 'restore_seconds': restore_s,
       'save_bytes_per_sec': nbytes / save_s, 'restore_bytes_per_sec': nbytes / restore_s,
       'async_block_seconds_median': block, 'async_block_seconds_max': max(blocks),
       'saves_timed': len(blocks), 'step_seconds_median': step_s,
       'loop_step_seconds_median': statistics.median(loop_times)}
  mib = lambda b: f'{b / 2**20:,.1f} MiB'
  rows = [
      ('config', f'{config.name}: train state {mib(nbytes)}'),
      ('machine', r['machine']),
      ('save (sync, to commit)', f'{save_s:.2f} s = {mib(nbytes / save_s)}/s'),
      ('restore', f'{restore_s:.2f} s = {mib(nbytes / restore_s)}/s'),
      ('async save holds the loop', f'{1000 * block:.0f} ms median, '
                                    f'{1000 * max(blocks):.0f} ms max ({len(blocks)} saves)'),
      ('step time', f'{1000 * step_s:.1f} ms (loop with saves: '
                    f'{1000 * r["loop_step_seconds_median"]:.1f} ms median)'),
  ]
  return r, rows


# ---- decode


def run_decode(argv: list[str]) -> int:
  """Hands ``decode`` and its flags to ``llm_jax.bench_decode.main``."""
  import importlib  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec('llm_jax.bench_decode') is None:
    cli.fail('bench decode needs llm_jax/bench_decode.py (the KV-cache decode '
          'work, issue 5), which this checkout does not have yet.')
  # Imported only now: its own flags must not clash with the other subcommands'.
  bench_decode = importlib.import_module('llm_jax.bench_decode')
  return int(bench_decode.main(argv) or 0)


# ---- CLI


def _write_json(path: str, result: dict) -> None:
  """Writes ``result`` to ``path`` atomically (temp file + rename)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.bench-', suffix='.json')
  with os.fdopen(fd, 'w') as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, path)


def main(argv) -> None:
  logging.set_verbosity(logging.WARNING)
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    extra = ' '.join(argv[1:]) or 'nothing'
    cli.fail(f'Expected one subcommand ({", ".join(SUBCOMMANDS)}), got {extra}. '
          'Example: python -m llm_jax.bench train --config=configs/base.py')
  from llm_jax import train  # pylint: disable=g-import-not-at-top
  from llm_jax.configuration import check_keys  # pylint: disable=g-import-not-at-top
  config = train.load_config()
  fn = {'train': bench_train, 'data': bench_data,
        'checkpoint': bench_checkpoint}[argv[1]]
  try:
    check_keys(config)
    if _STEPS.value < 1 or _WARMUP.value < 0:
      raise UserError(f'--steps={_STEPS.value} must be at least 1 and '
                      f'--warmup={_WARMUP.value} at least 0.')
    with config.unlocked():
      result, rows = fn(config, steps=_STEPS.value, warmup=_WARMUP.value)
  except UserError as e:
    cli.fail(str(e))
  print(f'\n## bench {argv[1]}\n\n{_table(rows)}\n', flush=True)
  if _OUT.value:
    _write_json(_OUT.value, result)
    print(f'Wrote {_OUT.value}', flush=True)


def entry() -> None:
  """``decode`` goes to its own module with its own flags; the rest parse here."""
  if len(sys.argv) > 1 and sys.argv[1] == 'decode':
    sys.exit(run_decode([f'{sys.argv[0]} decode', *sys.argv[2:]]))
  from llm_jax import train  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=train.parse_flags)


if __name__ == '__main__':
  entry()
