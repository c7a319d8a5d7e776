"""llm_jax's train step against PyTorch's on the same model, each in its own process.

    PYTHONPATH=. python benchmarks/side_by_side.py --rounds=3 [--shapes=small,gpt2_small_cpu]
        [--steps=5] [--warmup=2] [--threads=2] [--dtypes=float32,bfloat16]
        [--out=/tmp/sbs.json]

For each shape (``gpt2_small_cpu``: configs/gpt2_small_cpu.py, 6 layers d 512;
``small``: the same preset with 4 layers d 256) and each round, it runs one
fresh process per variant, alternating:

  torch eager fp32 · llm_jax fp32 (``python -m llm_jax.bench train``) ·
  torch.compile fp32 · torch eager bf16 autocast · llm_jax bf16
  (``--config.model.dtype=bfloat16``: bf16 compute, fp32 weights)

The PyTorch model mirrors the preset (LayerNorm, learned positions, tanh-GELU,
biases, tied embeddings, SDPA causal attention, AdamW with global-norm
clipping at the preset's hyper-parameters). Both sides time ``--steps`` steps
after ``--warmup`` (the median counts), block on each step, and measure a
2048^3 matmul in the step's dtype after every step (the same probe on both
sides, so both pay the same cache disturbance). Each library's fp32 and bf16
matmul peaks come from those probes. Every process gets the same thread
settings (OMP/MKL threads and ``torch.set_num_threads`` = ``--threads``,
``OMP_WAIT_POLICY`` = ``--omp_wait_policy``; XLA's CPU client sizes its pool
to the host's cores). The Markdown table reports
medians over rounds and ratios of medians, with the host's CPU model, its
AMX/AVX-512/AVX2/FMA flags and load average. bf16 is timed only where the CPU
has bf16 units (AMX or AVX-512 BF16) unless ``--dtypes`` says otherwise.

Needs torch (not a dependency of llm_jax). Without ``--worker`` this process
imports neither jax nor torch.
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from llm_jax.core import host

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHAPES = {  # name -> (preset, overrides as --config.KEY=VALUE pairs)
    'small': ('configs/gpt2_small_cpu.py',
              {'model.num_layers': 4, 'model.d_model': 256, 'model.num_heads': 4,
               'model.num_kv_heads': 4, 'model.mlp_dim': 1024}),
    'gpt2_small_cpu': ('configs/gpt2_small_cpu.py', {}),
}
# (name, library, dtype, torch mode) in the order one round runs them.
VARIANTS = [('torch eager', 'torch', 'float32', 'eager'),
            ('llm_jax', 'jax', 'float32', ''),
            ('torch.compile', 'torch', 'float32', 'compile'),
            ('torch eager autocast', 'torch', 'bfloat16', 'eager'),
            ('llm_jax', 'jax', 'bfloat16', '')]
MATMUL_FLOPS = 2 * 2048**3


def isa_flags() -> list[str]:
  """The AMX, AVX-512, AVX2 and FMA flags /proc/cpuinfo lists (empty off Linux)."""
  return sorted(f for f in host.cpu_flags() or ()
                if f.startswith(('amx', 'avx512', 'avx2', 'fma')))


def load_avg() -> str:
  try:
    return ' '.join(pathlib.Path('/proc/loadavg').read_text().split()[:3])
  except OSError:
    return '?'


def thread_env(threads: int, wait_policy: str = 'PASSIVE') -> dict:
  env = dict(os.environ)
  env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
             OMP_WAIT_POLICY=wait_policy,
             PYTHONPATH=f'{ROOT}{os.pathsep}{env.get("PYTHONPATH", "")}'.rstrip(os.pathsep))
  return env


# ---- the PyTorch worker (its own process)


DRY = {'data.seq_len': 32, 'train.batch_size': 2}  # --dry: tests the script, not speed.


def overrides(shape: str, dry: bool) -> dict:
  return {**SHAPES[shape][1], **(DRY if dry else {})}


def _torch_config(shape: str, dry: bool):
  from llm_jax.core import configuration  # pylint: disable=g-import-not-at-top
  c = configuration.load_preset(ROOT / SHAPES[shape][0])
  for key, value in overrides(shape, dry).items():
    section, name = key.split('.')
    c[section][name] = value
  return c


def torch_worker(shape: str, mode: str, dtype: str, steps: int, warmup: int,
                 threads: int, dry: bool = False) -> dict:
  """Times the PyTorch train step of ``shape``; returns the figures."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  # XLA:CPU flushes denormals to zero; eager PyTorch does not by default, and
  # its fp32 steps ran 2-3x slower on them (measured alternately, 4 layers d 256).
  torch.set_flush_denormal(True)
  torch.manual_seed(0)
  c = _torch_config(shape, dry)
  m, V, T, B = c.model, c.tokenizer.vocab_size, c.data.seq_len, c.train.batch_size
  D, L, N, Fd = m.d_model, m.num_layers, m.num_heads, m.mlp_dim

  class Block(nn.Module):

    def __init__(self):
      super().__init__()
      self.ln1, self.qkv, self.o = nn.LayerNorm(D), nn.Linear(D, 3 * D), nn.Linear(D, D)
      self.ln2, self.up, self.down = nn.LayerNorm(D), nn.Linear(D, Fd), nn.Linear(Fd, D)

    def forward(self, x):
      q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, N, D // N).permute(2, 0, 3, 1, 4)
      a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x = x + self.o(a.transpose(1, 2).reshape(B, T, D))
      return x + self.down(F.gelu(self.up(self.ln2(x)), approximate='tanh'))

  class GPT(nn.Module):

    def __init__(self):
      super().__init__()
      self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(T, D)
      self.blocks = nn.ModuleList([Block() for _ in range(L)])
      self.ln = nn.LayerNorm(D)

    def forward(self, idx, tgt):
      x = self.wte(idx) + self.wpe(torch.arange(T))
      for b in self.blocks:
        x = b(x)
      logits = self.ln(x) @ self.wte.weight.T
      return F.cross_entropy(logits.float().view(-1, V), tgt.view(-1))

  model = GPT()
  opt = torch.optim.AdamW(model.parameters(), lr=c.optim.learning_rate,
                          betas=(c.optim.b1, c.optim.b2),
                          weight_decay=c.optim.weight_decay)
  fwd = torch.compile(model) if mode == 'compile' else model
  inputs, targets = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
  tdtype = torch.bfloat16 if dtype == 'bfloat16' else torch.float32
  a = torch.ones(2048, 2048, dtype=tdtype)

  def step():
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
      loss = fwd(inputs, targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if c.optim.clip_norm:
      torch.nn.utils.clip_grad_norm_(model.parameters(), c.optim.clip_norm)
    opt.step()
    return float(loss.detach())

  def peak():
    best = 0.0
    for _ in range(2):  # Best of 2, as llm_jax's per-step probe.
      t0 = time.perf_counter()
      torch.mm(a, a)
      best = max(best, MATMUL_FLOPS / (time.perf_counter() - t0))
    return best

  t0 = time.perf_counter()
  step()
  first = time.perf_counter() - t0
  for _ in range(warmup):
    step()
  times, peaks = [], []
  for _ in range(steps):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
    peaks.append(peak())
  return {'step_seconds': times, 'step_seconds_median': statistics.median(times),
          'peak_flops_samples': peaks, 'first_step_seconds': first,
          'tokens_per_step': B * T, 'loss': loss, 'threads': torch.get_num_threads(),
          'torch': torch.__version__}


# ---- the orchestrator (imports neither library)


def _run_torch(shape, mode, dtype, args, tmp) -> dict:
  out = pathlib.Path(tmp) / 'torch.json'
  cmd = [sys.executable, __file__, '--worker=torch', f'--shape={shape}', f'--mode={mode}',
         f'--dtype={dtype}', f'--steps={args.steps}', f'--warmup={args.warmup}',
         f'--threads={args.threads}', f'--out={out}'] + (['--dry'] if args.dry else [])
  subprocess.run(cmd, check=True, env=thread_env(args.threads, args.omp_wait_policy),
                 cwd=ROOT, stdout=subprocess.DEVNULL)
  return json.loads(out.read_text())


def _run_jax(shape, dtype, args, tmp) -> dict:
  out = pathlib.Path(tmp) / 'jax.json'
  cmd = [sys.executable, '-m', 'llm_jax.bench', 'train', f'--config={SHAPES[shape][0]}',
         f'--config.model.dtype={dtype}', f'--steps={args.steps}',
         f'--warmup={args.warmup}', f'--out={out}']
  cmd += [f'--config.{k}={v}' for k, v in overrides(shape, args.dry).items()]
  subprocess.run(cmd, check=True, env=thread_env(args.threads, args.omp_wait_policy),
                 cwd=ROOT, stdout=subprocess.DEVNULL)
  r = json.loads(out.read_text())
  r['peak_flops_samples'] = r['peak_flops_samples'] or [r['peak_flops']]
  r['tokens_per_step'] = r['batch'] * r['seq_len']
  return r


def run_rounds(args, on_round=lambda report: None) -> dict:
  """Every (shape, variant) for ``args.rounds`` rounds, alternated.

  ``on_round`` gets the report so far after each round.
  """
  variants = [v for v in VARIANTS if v[2] in args.dtypes]
  results = {s: {f'{v[0]} {v[2]}': [] for v in variants} for s in args.shapes}
  load = [load_avg()]
  with tempfile.TemporaryDirectory(prefix='side_by_side_') as tmp:
    for rnd in range(args.rounds):
      for shape in args.shapes:
        order = variants if rnd % 2 == 0 else variants[::-1]
        for name, lib, dtype, mode in order:
          t0 = time.perf_counter()
          r = (_run_torch(shape, mode, dtype, args, tmp) if lib == 'torch'
               else _run_jax(shape, dtype, args, tmp))
          results[shape][f'{name} {dtype}'].append(r)
          print(f'round {rnd + 1} {shape:<15} {name} {dtype}: '
                f'{1000 * r["step_seconds_median"]:.1f} ms/step '
                f'({time.perf_counter() - t0:.0f} s, load {load_avg()})',
                file=sys.stderr, flush=True)
      load.append(load_avg())
      report = {'results': results, 'load_average': load, 'isa': isa_flags(),
                'cpu': host.cpu_model(),
                'rounds': rnd + 1, 'steps': args.steps, 'warmup': args.warmup,
                'threads': args.threads, 'omp_wait_policy': args.omp_wait_policy}
      on_round(report)
  return report


def _median_of(runs, key):
  return statistics.median(r[key] for r in runs)


def markdown(report: dict, flops_per_token: dict) -> str:
  """The table of medians over rounds and ratios of medians."""
  lines = [f'Host: {report.get("cpu", "?")}; ISA: {" ".join(report["isa"]) or "(none listed)"}; '
           f'{report["threads"]} threads each, OMP_WAIT_POLICY='
           f'{report.get("omp_wait_policy", "?")}; {report["rounds"]} rounds x '
           f'{report["steps"]} timed steps (after {report["warmup"]} warm-up); '
           f'load average {" -> ".join(report["load_average"])}.', '']
  lines += ['| shape | variant | dtype | step ms (median) | tokens/s | vs torch eager fp32 '
            '| MFU vs own lib peak |', '|---|---|---|---:|---:|---:|---:|']
  peaks = {}
  for shape, by_variant in report['results'].items():
    base = _median_of(by_variant['torch eager float32'], 'step_seconds_median')
    for key, runs in by_variant.items():
      name, dtype = key.rsplit(' ', 1)
      lib = 'llm_jax' if name == 'llm_jax' else 'torch'
      med = _median_of(runs, 'step_seconds_median')
      samples = [p for r in runs for p in r['peak_flops_samples']]
      peaks.setdefault((lib, dtype), []).extend(samples)
      tokens = runs[0]['tokens_per_step']
      mfu = tokens * flops_per_token[shape] / med / statistics.median(samples)
      lines.append(f'| {shape} | {name} | {dtype} | {1000 * med:,.1f} | '
                   f'{tokens / med:,.0f} | {base / med:.2f}x | {100 * mfu:.0f}% |')
  lines += ['', '| 2048^3 matmul | fp32 GFLOP/s | bf16 GFLOP/s |', '|---|---:|---:|']
  for lib in ('torch', 'llm_jax'):
    cells = [f'{statistics.median(peaks[(lib, d)]) / 1e9:,.0f}' if (lib, d) in peaks else '-'
             for d in ('float32', 'bfloat16')]
    lines.append(f'| {"torch.mm" if lib == "torch" else "llm_jax (model.cpu_matmul)"} | '
                 f'{cells[0]} | {cells[1]} |')
  lines += ['', 'Ratios are of medians over rounds (each round: one process per variant, '
            'median of its timed steps). "vs torch eager fp32" > 1 means faster.',
            'MFU: PaLM FLOPs per token x tokens / step time / the median 2048^3 matmul '
            'rate of the same library and dtype sampled after each step.']
  return '\n'.join(lines)


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--shapes', default='small,gpt2_small_cpu')
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--threads', type=int, default=os.cpu_count())
  p.add_argument('--out', default='')
  p.add_argument('--dtypes', default='',
                 help='Comma-separated float32,bfloat16 (default: both where the CPU '
                      'has AMX or AVX-512 BF16, else float32 only).')
  p.add_argument('--omp_wait_policy', default='PASSIVE', choices=['PASSIVE', 'ACTIVE'],
                 help='OMP_WAIT_POLICY of every process. PASSIVE: spinning OpenMP '
                      'threads (ACTIVE) made PyTorch steps 10-30x slower on a shared '
                      'host at load average 6.')
  p.add_argument('--dry', action='store_true',
                 help='Tiny batch and sequence (tests the script, not speed).')
  p.add_argument('--worker', choices=['torch'], help=argparse.SUPPRESS)
  p.add_argument('--shape', help=argparse.SUPPRESS)
  p.add_argument('--mode', help=argparse.SUPPRESS)
  p.add_argument('--dtype', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.shapes = [s for s in args.shapes.split(',') if s]
  unknown = [s for s in args.shapes if s not in SHAPES]
  if unknown:
    p.error(f'unknown --shapes {unknown}: use {",".join(SHAPES)}')
  if args.dtypes:
    args.dtypes = [d for d in args.dtypes.split(',') if d]
  else:
    args.dtypes = ['float32'] + (['bfloat16'] if host.has_bf16_units(isa_flags()) else [])
    if 'bfloat16' not in args.dtypes and not args.worker:
      print('This CPU has neither AMX nor AVX-512 BF16: measuring float32 only '
            '(--dtypes=float32,bfloat16 to time bf16 anyway).', file=sys.stderr)
  wrong = [d for d in args.dtypes if d not in ('float32', 'bfloat16')]
  if wrong or 'float32' not in args.dtypes:
    p.error(f'--dtypes={",".join(args.dtypes)}: use float32 or float32,bfloat16 '
            '(float32 is the baseline every ratio is against)')
  return args


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  if args.worker == 'torch':
    r = torch_worker(args.shape, args.mode, args.dtype, args.steps, args.warmup,
                     args.threads, args.dry)
    pathlib.Path(args.out).write_text(json.dumps(r))
    return

  def write(report):
    # FLOPs per token from llm_jax's own report of each shape (the same model).
    flops = {s: v['llm_jax float32'][0]['flops_per_token']
             for s, v in report['results'].items()}
    table = markdown(report, flops)
    if args.out:  # After every round: a long measurement keeps what it has.
      pathlib.Path(args.out).write_text(json.dumps({**report, 'table': table}, indent=1))
    return table

  table = write(run_rounds(args, write))
  print(f'\n{" ".join(sys.argv)}\n\n{table}\n', flush=True)


if __name__ == '__main__':
  main()
