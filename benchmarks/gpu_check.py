"""One-shot GPU check: correctness on the GPU first, then `bench train` figures, in one command.

    PYTHONPATH=. python benchmarks/gpu_check.py --out=/tmp/gpu_check        # on the GPU machine
    PYTHONPATH=. python benchmarks/gpu_check.py --dry --out=/tmp/gpu_dry    # here: tiny, CPU

Made for a machine lent for minutes (one H200, 10 minutes a command, no
network, no TensorFlow, no ml_collections): every part runs in its own
process under a share of ``--budget_s``, writes its files under ``--out`` as
it finishes, and a part that fails or runs out of time is recorded and the
next one runs. Nothing here imports TensorFlow.

1. ``checks-cpu`` and ``checks-gpu``: the same checks in a CPU-only process
   and a default-device (GPU) process, at matmul precision 'highest': three
   train steps of configs/tiny.py on one fixed batch (losses), the full
   forward's logits on a prompt, KV-cache greedy decoding against greedy by
   full recomputation on the same device, and (on a GPU) cuDNN attention
   against XLA attention in bf16. The parent compares the two processes.
2. ``bench train`` (``python -m llm_jax.bench train``) for configs/llama_1b.py
   (bf16, sequence 2048, batch 16, cuDNN then XLA attention) and
   configs/gpt2_124m.py (bf16, sequence 1024, batch 32), MFU against the
   H200's 989 TFLOP/s bf16 dense peak, and the device's peak memory.

Writes ``OUT/summary.md`` (also printed), ``OUT/checks-*.json``,
``OUT/bench-*.json`` and ``OUT/*.log``. ``--dry`` runs all of it on this CPU
with tiny shapes (the figures mean nothing; it tests the script).

ml_collections is pure Python: if it is missing, wheels in ``--wheels``
(default ``shared/wheels``) go on the path; fill that folder here with
``pip download ml_collections --no-deps -d shared/wheels/``.
"""
import argparse
import glob
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
H200_PEAK = 989e12  # bf16 dense, data sheet.
# (name, preset, overrides) of the `bench train` runs, in order.
RUNS = [
    ('llama_1b-cudnn', 'configs/llama_1b.py:h100x8',
     {'model.attention': 'cudnn', 'train.batch_size': 16, 'optim.grad_accum_steps': 1}),
    ('llama_1b-xla', 'configs/llama_1b.py:h100x8',
     {'model.attention': 'xla', 'train.batch_size': 16, 'optim.grad_accum_steps': 1}),
    ('gpt2_124m', 'configs/gpt2_124m.py:h100x8',
     {'model.attention': 'auto', 'train.batch_size': 32, 'optim.grad_accum_steps': 1}),
]
# --dry: the same presets shrunk to CPU size, XLA attention.
DRY = {'model.num_layers': 2, 'model.d_model': 64, 'model.num_heads': 4,
       'model.num_kv_heads': 2, 'model.head_dim': 16, 'model.mlp_dim': 128,
       'tokenizer.vocab_size': 512, 'data.seq_len': 64, 'train.batch_size': 2,
       'train.loss_chunk': 0, 'model.attention': 'xla', 'model.dtype': 'float32'}


def wheel_path(wheels: str) -> list[str]:
  """Wheels to put on sys.path when ml_collections is missing (zip import)."""
  if importlib.util.find_spec('ml_collections') is not None:
    return []
  return sorted(glob.glob(os.path.join(ROOT, wheels, '*.whl')))


def child_env(wheels: list[str], cpu_only: bool = False) -> dict:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([str(ROOT), *wheels, env.get('PYTHONPATH', '')])
  env.pop('XLA_FLAGS', None)  # One device, whatever the caller's shell has.
  if cpu_only:
    env['JAX_PLATFORMS'] = 'cpu'
  return env


# ---- part 1: the checks (a child process; prints JSON)


def checks(dry: bool) -> dict:
  """Runs the correctness checks on this process's default device."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from llm_jax.core import configuration  # pylint: disable=g-import-not-at-top
  from llm_jax.inference import decode  # pylint: disable=g-import-not-at-top
  from llm_jax.perf import measure  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_default_matmul_precision', 'highest')
  c = configuration.load_preset(ROOT / 'configs/tiny.py')
  c.mesh.data, c.train.batch_size = 1, 4
  tr = measure.build_trainer(c)
  state, batch = tr.init_fn(), measure.random_batch(tr, c, seed=1)
  losses = []
  for _ in range(3):
    state, m = tr.step_fn(state, batch)
    losses.append(float(m['loss']))
  prompt = [int(t) for t in np.asarray(batch['inputs'])[0, :8]]
  model_logits = decode._full_logits(state.params, np.asarray([prompt], np.int32),  # pylint: disable=protected-access
                                     graphdef=tr.graphdef)
  cached = decode.generate(tr.graphdef, state.params, [prompt], max_new_tokens=16,
                           temperature=0.0, seed=0, max_len=tr.model_cfg.max_len,
                           pad_id=0, eos_id=-1)[0]
  full = decode.full_recompute_greedy(tr.graphdef, state.params, prompt, 16)
  r = {'device': str(jax.devices()[0].device_kind), 'platform': jax.devices()[0].platform,
       'jax': jax.__version__, 'losses': losses,
       'logits_first': np.asarray(model_logits, np.float64)[0, -1, :16].tolist(),
       'decode_cached': cached, 'decode_full_recompute': full}
  if r['platform'] == 'gpu' and not dry:
    r['attention_cudnn_vs_xla_max_abs'] = _attention_diff()
  return r


def _attention_diff() -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from llm_jax.model import attention  # pylint: disable=g-import-not-at-top
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  B, T, N, K, H = 2, 512, 8, 2, 64
  q = jax.random.normal(kq, (B, T, N, H), jnp.bfloat16)
  k = jax.random.normal(kk, (B, T, K, H), jnp.bfloat16)
  v = jax.random.normal(kv, (B, T, K, H), jnp.bfloat16)
  mask = jnp.tril(jnp.ones((1, T, T), bool))
  out = {b: attention.attend(q, k, v, mask, backend=b).astype(jnp.float32)
         for b in ('cudnn', 'xla')}
  return float(jnp.max(jnp.abs(out['cudnn'] - out['xla'])))


def compare(cpu: dict, gpu: dict) -> list[tuple[str, bool, str]]:
  """(check, passed, detail) rows from the two processes' results."""
  rel = max(abs(a - b) / abs(a) for a, b in zip(cpu['losses'], gpu['losses']))
  logit = max(abs(a - b) for a, b in zip(cpu['logits_first'], gpu['logits_first']))
  same = sum(a == b for a, b in zip(cpu['decode_cached'], gpu['decode_cached']))
  rows = [
      ('3 train steps: loss, GPU vs CPU', rel < 1e-4, f'max relative difference {rel:.2e}'),
      ('forward logits, GPU vs CPU', logit < 1e-3, f'max abs difference {logit:.2e}'),
      ('KV-cache greedy = full recompute (GPU)',
       gpu['decode_cached'] == gpu['decode_full_recompute'],
       f'{gpu["decode_cached"]} vs {gpu["decode_full_recompute"]}'),
      ('greedy tokens, GPU vs CPU', same >= len(cpu['decode_cached']) - 2,
       f'{same}/{len(cpu["decode_cached"])} equal (near-ties may differ)'),
  ]
  if 'attention_cudnn_vs_xla_max_abs' in gpu:
    d = gpu['attention_cudnn_vs_xla_max_abs']
    rows.append(('cuDNN vs XLA attention (bf16)', d < 5e-2, f'max abs difference {d:.3g}'))
  return rows


# ---- the parent


class Parts:
  """Runs child processes under one time budget; collects logs and results."""

  def __init__(self, out: pathlib.Path, budget_s: float, wheels: list[str]):
    self.out, self.deadline, self.wheels = out, time.monotonic() + budget_s, wheels
    self.status = {}

  def run(self, name: str, cmd: list[str], cap_s: float, cpu_only=False) -> bool:
    left = self.deadline - time.monotonic()
    if left < 20:
      self.status[name] = 'skipped: out of time'
      return False
    t0 = time.monotonic()
    with open(self.out / f'{name}.log', 'w') as log:
      try:
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(self.wheels, cpu_only),
                              stdout=log, stderr=subprocess.STDOUT,
                              timeout=min(cap_s, left))
        ok = proc.returncode == 0
        self.status[name] = 'ok' if ok else f'failed (exit {proc.returncode})'
      except subprocess.TimeoutExpired:
        ok, self.status[name] = False, f'timed out after {min(cap_s, left):.0f} s'
    self.status[name] += f', {time.monotonic() - t0:.0f} s'
    print(f'{name}: {self.status[name]}', flush=True)
    return ok


def bench_cmd(preset: str, overrides: dict, out: pathlib.Path, dry: bool) -> list[str]:
  if dry:
    preset, overrides = preset.split(':')[0] + ':cpu', {**overrides, **DRY}
  cmd = [sys.executable, '-m', 'llm_jax.bench', 'train', f'--config={preset}',
         f'--out={out}', '--steps=2' if dry else '--steps=10', '--warmup=1' if dry else '--warmup=2']
  cmd += [f'--config.{k}={v}' for k, v in overrides.items()]
  if not dry:
    cmd += ['--config.model.dtype=bfloat16', f'--config.train.peak_flops={H200_PEAK}']
  return cmd


def summary(out: pathlib.Path, parts: Parts, rows: list, dry: bool) -> str:
  lines = [f'# gpu_check{" --dry (CPU, tiny shapes: figures mean nothing)" if dry else ""}',
           '', '| part | status |', '|---|---|']
  lines += [f'| {k} | {v} |' for k, v in parts.status.items()]
  lines += ['', '| check | passed | detail |', '|---|---|---|']
  lines += [f'| {n} | {"yes" if ok else "**NO**"} | {d} |' for n, ok, d in rows]
  lines += ['', '| run | step ms | tokens/s | MFU | peak memory GiB | compile s |',
            '|---|---:|---:|---:|---:|---:|']
  for name, _, _ in RUNS:
    f = out / f'bench-{name}.json'
    if not f.exists():
      lines.append(f'| {name} | - | - | - | - | - |')
      continue
    r = json.loads(f.read_text())
    mem = r['peak_device_bytes'] or r['peak_rss_bytes']
    lines.append(f'| {name} | {1000 * r["step_seconds_median"]:.1f} | '
                 f'{r["tokens_per_sec"]:,.0f} | {100 * r["mfu"]:.1f}% | '
                 f'{mem / 2**30:.1f} | {r["compile_seconds"]:.1f} |')
  lines += ['', f'MFU: PaLM FLOPs (6N + attention) x tokens/s / '
            f'{"the measured CPU peak" if dry else "989 TFLOP/s (H200 bf16 dense)"}.']
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default='gpu_check_out')
  p.add_argument('--dry', action='store_true', help='Tiny shapes on this CPU.')
  p.add_argument('--budget_s', type=float, default=540)
  p.add_argument('--wheels', default='shared/wheels')
  p.add_argument('--part', choices=['checks'], help=argparse.SUPPRESS)
  p.add_argument('--result', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.part == 'checks':
    pathlib.Path(args.result).write_text(json.dumps(checks(args.dry), indent=1))
    return 0
  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  parts = Parts(out, args.budget_s, wheel_path(args.wheels))
  me = [sys.executable, str(pathlib.Path(__file__).resolve()), '--part=checks'] + (
      ['--dry'] if args.dry else [])
  results = {}
  for side in ('cpu', 'gpu'):
    result = out / f'checks-{side}.json'
    if parts.run(f'checks-{side}', me + [f'--result={result}'], 150,
                 cpu_only=side == 'cpu'):
      results[side] = json.loads(result.read_text())
  rows = compare(results['cpu'], results['gpu']) if len(results) == 2 else [
      ('checks ran in both processes', False, 'see checks-*.log')]
  for name, preset, overrides in RUNS:
    parts.run(f'bench-{name}', bench_cmd(preset, overrides, out / f'bench-{name}.json',
                                         args.dry), 200)
  text = summary(out, parts, rows, args.dry)
  (out / 'summary.md').write_text(text + '\n')
  print(f'\n{text}\n\nFiles in {out}', flush=True)
  failed = [n for n, ok, _ in rows if not ok] + [
      k for k, v in parts.status.items() if not v.startswith('ok')]
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
