"""Training-side benchmarks behind ``python -m llm_jax.bench train|data|checkpoint``.

  train       compile time, steady-state step time (median of ``steps``
              steps after ``warmup``, each blocked on), tokens/s, MFU and
              peak memory of the real train step on random tokens.
  data        batches/s of the input pipeline against the batches/s a
              train step consumes (prepares the config's data first).
  checkpoint  save and restore bytes/s of the train state, and how long an
              async save holds the loop against the step time.

MFU follows the PaLM convention (``metrics.train_flops_per_token``: 6N for the
matmul parameters plus 12 * layers * heads * head_dim * seq for attention). On
CPU the peak is a 2048^3 matmul in the model's compute dtype sampled after
every timed step; the best sample counts, so drift of a shared machine cannot
flatter the figure. On TPU/GPU the data-sheet bf16 peak
(``metrics.PEAK_FLOPS_BY_KIND``) or ``config.train.peak_flops``.
"""

import os
import resource
import shutil
import statistics
import tempfile
import time


GIB = 2**30


def build_trainer(config):
  """The Trainer of ``config`` on all local devices (vocab from the tokenizer config)."""
  from llm_jax.training import sharding  # pylint: disable=g-import-not-at-top
  from llm_jax.training import trainer  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config.mesh)
  return trainer.Trainer.build(config, config.tokenizer.vocab_size, mesh)


def random_batch(tr, config, seed: int = 0) -> dict:
  """Uniform random tokens in the batch contract's shapes, placed on the mesh."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from llm_jax.training import sharding  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  shape = (config.train.batch_size, config.data.seq_len)
  local = {k: rng.integers(0, tr.model_cfg.vocab_size, shape, dtype=np.int32)
           for k in ('inputs', 'targets')}
  del jax
  return sharding.global_batch(local, tr.batch_sharding)


def _cpu_peak(dtype: str, backend: str = 'xla') -> float:
  """FLOP/s of a 2048^3 matmul in ``dtype`` on this host (best of 5)."""
  from llm_jax.training import metrics  # pylint: disable=g-import-not-at-top
  return metrics.measure_cpu_matmul_peak(dtype=dtype, backend=backend)


def _cpu_peak_sample(dtype: str, backend: str) -> float:
  """One quick sample of the matmul peak (best of 2), between two steps."""
  from llm_jax.training import metrics  # pylint: disable=g-import-not-at-top
  return metrics.measure_cpu_matmul_peak(repeats=2, dtype=dtype, backend=backend)


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


def table(rows: list[tuple[str, str]]) -> str:
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
  from llm_jax.training import metrics  # pylint: disable=g-import-not-at-top
  tr = build_trainer(config)
  cfg, seq, batch_size = tr.model_cfg, config.data.seq_len, config.train.batch_size
  measure_peak = jax.devices()[0].platform == 'cpu' and not config.train.peak_flops
  backend = cfg.cpu_matmul
  peak_before = _cpu_peak(cfg.dtype, backend) if measure_peak else None
  state = tr.init_fn()
  batch = random_batch(tr, config)
  t0 = time.perf_counter()
  lowered = tr.step_fn.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  # On CPU the peak is sampled after every step: a shared machine's load
  # changes by the second, and each step is compared with the matmul rate of
  # its own moment.
  probe = (lambda: _cpu_peak_sample(cfg.dtype, backend)) if measure_peak else None
  state, times, peaks = time_steps(compiled, state, batch, warmup=warmup,
                                   steps=steps, probe=probe)
  median = statistics.median(times)
  tokens = batch_size * seq
  flops_tok = metrics.train_flops_per_token(cfg, seq)
  tps = tokens / median
  if measure_peak:
    peak_after = _cpu_peak(cfg.dtype, backend)
    peak = statistics.median(peaks)
    best_peak = max(peaks + [peak_before, peak_after])
    mfu = statistics.median(tokens * flops_tok / t / p for t, p in zip(times, peaks))
    # The model's dense layers run through model.cpu_matmul (oneMKL on CPU
    # unless 'xla'): the peak is that product's, XLA's dot is given beside it.
    via = ('jnp.dot' if backend == 'xla' else
           f'matmul through model.cpu_matmul={backend}, as the dense layers run it')
    peak_src = (f'{cfg.dtype} 2048^3 {via}, measured in this run after every '
                f'step (median; {min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f}), '
                f'{peak_before / 1e9:.0f} before and {peak_after / 1e9:.0f} after')
    xla_peak = _cpu_peak(cfg.dtype) if backend != 'xla' else peak
  else:
    peak, peak_src = metrics.peak_flops(config.train.peak_flops)
    peak_after, best_peak, mfu, xla_peak = None, peak, tps * flops_tok / peak, None
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
      'xla_dot_peak_flops': xla_peak,
      'mfu_vs_xla_dot': tps * flops_tok / xla_peak if xla_peak else None,
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
      (f'step time (median of {len(times)})',
       f'{1000 * median:.1f} ms (min {1000 * min(times):.1f}, max {1000 * max(times):.1f})'),
      ('tokens/s', f'{tps:,.0f}'),
      ('FLOPs/token (PaLM 6N + attention)', f'{flops_tok / 1e6:.1f} M'),
      ('achieved', f'{tps * flops_tok / 1e9:.1f} GFLOP/s'),
      ('peak', f'{peak / 1e9:.1f} GFLOP/s ({peak_src})'),
      ('**MFU**', f'**{100 * r["mfu"]:.1f}%**'),
      ('MFU vs the best peak seen', f'{100 * r["mfu_vs_best_peak"]:.1f}% '
                                    f'({best_peak / 1e9:.0f} GFLOP/s)'),
  ]
  if xla_peak and xla_peak is not peak:
    rows.append(('MFU vs XLA\'s own dot', f'{100 * r["mfu_vs_xla_dot"]:.1f}% '
                 f'({cfg.dtype} 2048^3 jnp.dot after the run: {xla_peak / 1e9:.0f} GFLOP/s)'))
  rows += [
      ('compiled temporaries', f'{r["compiled_temp_bytes"] / GIB:.3f} GiB'
       if r['compiled_temp_bytes'] is not None else '?'),
      ('peak memory', mem_row),
  ]
  return r, rows


# ---- data


def bench_data(config, *, steps: int, warmup: int) -> tuple[dict, list]:
  """Batches/s the input pipeline delivers against what a train step takes."""
  import jax  # pylint: disable=g-import-not-at-top
  from llm_jax.training import metrics  # pylint: disable=g-import-not-at-top
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
  tr = build_trainer(config)
  state = tr.init_fn()
  batch = random_batch(tr, config)
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
      (f'pipeline (prefetch thread, {n} batches)',
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


def bench_checkpoint(config, *, steps: int, warmup: int, save_every: int = 5,
                     directory: str = '') -> tuple[dict, list]:
  """Save/restore bytes/s of the whole train state; async-save blocking time."""
  import jax  # pylint: disable=g-import-not-at-top
  from llm_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  tr = build_trainer(config)
  state = tr.init_fn()
  batch = random_batch(tr, config)
  state, times, _ = time_steps(tr.step_fn, state, batch, warmup=max(warmup, 1),
                            steps=max(min(steps, 10), 3))
  step_s = statistics.median(times)
  nbytes = _tree_bytes(state)
  own_dir = not directory
  root = directory or tempfile.mkdtemp(prefix='llm_jax_bench_ckpt_')
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
    every = max(save_every, 1)
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
