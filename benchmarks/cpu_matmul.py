"""oneMKL custom call against XLA's dot on CPU (``model.cpu_matmul``), timed alternately.

  PYTHONPATH=. python benchmarks/cpu_matmul.py peak    # 2048^3: jnp.dot, oneMKL, torch.mm
  PYTHONPATH=. python benchmarks/cpu_matmul.py step    # gpt2_small_cpu train step, xla vs mkl
  PYTHONPATH=. python benchmarks/cpu_matmul.py layers  # that step's dense shapes, one at a time
  PYTHONPATH=. python benchmarks/cpu_matmul.py attention  # one layer's attention: XLA, fused, torch
  PYTHONPATH=. python benchmarks/cpu_matmul.py adamw   # AdamW: Optax's fusions vs one call per parameter

``peak`` times a 2048^3 product in float32 and bfloat16 (bf16 operands,
float32 result) through ``jnp.dot`` and through ``llm_jax.model.cpu_matmul``,
alternating the two for ``--rounds`` rounds, then ``torch.mm`` in a separate
process (PyTorch's oneDNN and XLA each start their own threads; one process
each keeps them from competing). ``step`` builds the train step of
configs/gpt2_small_cpu.py twice in one process, ``model.cpu_matmul='xla'`` and
``'mkl'``, and alternates them step by step, so load from other jobs falls on
both alike. ``layers`` times each dense shape of that step (rows 8 x 256)
alone, forward only and forward + backward of ``sum(tanh(x @ w + b))``,
alternating the two backends. ``attention`` times one layer's causal
attention of that step (8 x 256 tokens, 8 heads of 64), forward and forward +
backward, as ``attention.xla_attend`` and as the fused CPU kernel
(``llm_jax.model.cpu_attention``) alternated, then PyTorch's
``scaled_dot_product_attention(is_causal=True)`` in its own process (2
threads). ``adamw`` times the optimizer update of gpt2_small_cpu's parameters
alone (Optax's chain compiled by XLA against ``llm_jax.training.fused_adamw``),
then the whole train step built with and without the fused update, each pair
alternated in one process. Medians in milliseconds (GFLOP/s for ``peak``
and ``layers``) and the ratios are printed.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

N = 2048
TORCH_PEAK = """
import sys, time, torch
n = int(sys.argv[1])
for name, dt in (('float32', torch.float32), ('bfloat16', torch.bfloat16)):
  a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
  torch.mm(a, b)
  times = []
  for _ in range(int(sys.argv[2]) * 3):
    t = time.perf_counter(); torch.mm(a, b); times.append(time.perf_counter() - t)
  print(name, 2 * n**3 / sorted(times)[len(times) // 2] / 1e9)
"""


def _median_gflops(times):
  return 2 * N**3 / statistics.median(times) / 1e9


def peak(rounds: int) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from llm_jax.model import cpu_matmul  # pylint: disable=import-outside-toplevel
  print(f'oneMKL custom call available: {cpu_matmul.available()}')
  for dtype in (jnp.float32, jnp.bfloat16):
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (N, N)).astype(dtype)
    b = jax.random.normal(k2, (N, N)).astype(dtype)
    fns = {backend: jax.jit(lambda x, y, backend=backend: cpu_matmul.matmul(
        x, y, backend=backend, preferred_element_type=jnp.float32))
           for backend in ('xla', 'mkl')}
    times = {name: [] for name in fns}
    for fn in fns.values():
      fn(a, b).block_until_ready()
    for _ in range(rounds):
      for name, fn in fns.items():
        for _ in range(3):
          t = time.perf_counter()
          fn(a, b).block_until_ready()
          times[name].append(time.perf_counter() - t)
    xla, mkl = _median_gflops(times['xla']), _median_gflops(times['mkl'])
    print(f'{jnp.dtype(dtype).name:8s} jnp.dot {xla:7.0f} GFLOP/s   oneMKL {mkl:7.0f} '
          f'GFLOP/s   ({mkl / xla:.2f}x)')
  try:
    out = subprocess.run([sys.executable, '-c', TORCH_PEAK, str(N), str(rounds)],
                         capture_output=True, text=True, check=True).stdout
  except (subprocess.CalledProcessError, FileNotFoundError) as e:
    print(f'torch.mm not measured: {e}')
    return
  for line in out.split('\n'):
    if line:
      name, value = line.split()
      print(f'{name:8s} torch.mm {float(value):6.0f} GFLOP/s (own process)')


def _step_fn(dtype: str, backend: str):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from llm_jax.core import configuration  # pylint: disable=import-outside-toplevel
  from llm_jax.training import sharding, trainer  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  config = configuration.load_preset('gpt2_small_cpu')
  config.model.dtype = dtype
  config.model.cpu_matmul = backend
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  vocab = 8192
  tr = trainer.Trainer.build(config, vocab, mesh)
  state = tr.init_fn()
  tokens = np.random.default_rng(0).integers(
      0, vocab, (config.train.batch_size, config.data.seq_len + 1), dtype=np.int32)
  batch = sharding.global_batch(
      {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}, tr.batch_sharding)
  return tr.step_fn, state, batch


def _alternate(fns: dict, rounds: int, steps: int) -> dict:
  """Median ms of each ``fn()`` (which blocks), alternated round by round."""
  times = {k: [] for k in fns}
  for fn in fns.values():
    fn()  # Compile and warm up.
  for r in range(rounds):
    for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
      for _ in range(steps):
        t = time.perf_counter()
        fns[k]()
        times[k].append(time.perf_counter() - t)
  return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def adamw(dtypes: list, rounds: int, steps: int) -> None:
  """The AdamW update alone, then the train step, with and without the fused update."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from llm_jax.core import configuration  # pylint: disable=import-outside-toplevel
  from llm_jax.training import fused_adamw, optim  # pylint: disable=import-outside-toplevel
  config = configuration.load_preset('gpt2_small_cpu')
  fn, state, _ = _step_fn('float32', 'auto')
  del fn
  tx = optim.make_optimizer(config.optim, config.train.steps)
  fused = fused_adamw.make_update(
      config, optim.learning_rate_schedule(config.optim, config.train.steps))
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3, p.dtype), state.params)

  def optax_update(params, opt_state):
    norm = optax.tree.norm(grads)
    finite = jnp.isfinite(norm)
    updates, new_state = tx.update(grads, opt_state, params)
    keep = lambda n, o: jax.tree.map(lambda a, b: jnp.where(finite, a, b), n, o)  # noqa: E731
    return keep(optax.apply_updates(params, updates), params), keep(new_state, opt_state)

  def fused_update(params, opt_state):
    norm = optax.tree.norm(grads)
    return fused(tx, grads, opt_state, params, norm, jnp.isfinite(norm))

  def runner(update):
    f = jax.jit(update, donate_argnums=(0, 1))
    box = [jax.tree.map(jnp.copy, state.params), tx.init(state.params)]

    def run():
      box[:] = f(*box)
      jax.block_until_ready(box)
    return run

  t = _alternate({'optax': runner(optax_update), 'fused': runner(fused_update)},
                 rounds, 5 * steps)
  n = sum(p.size for p in jax.tree.leaves(state.params))
  print(f'AdamW update of {n / 1e6:.1f}M parameters: Optax {t["optax"]:.1f} ms, '
        f'fused {t["fused"]:.1f} ms; optax/fused = {t["optax"] / t["fused"]:.2f}')
  for dtype in dtypes:
    runs = {}
    for name in ('optax', 'fused'):
      if name == 'optax':
        real, fused_adamw.make_update = fused_adamw.make_update, lambda *a: None
      try:
        runs[name] = list(_step_fn(dtype, 'auto'))
      finally:
        if name == 'optax':
          fused_adamw.make_update = real

    def stepper(run):
      def go():
        run[1], m = run[0](run[1], run[2])
        jax.block_until_ready(m)
      return go
    t = _alternate({k: stepper(r) for k, r in runs.items()}, rounds, steps)
    print(f'{dtype} train step (model.cpu_matmul=auto): Optax update {t["optax"]:.0f} ms, '
          f'fused {t["fused"]:.0f} ms; optax/fused = {t["optax"] / t["fused"]:.2f}')


def step(dtype: str, rounds: int, steps: int) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  runs = {b: list(_step_fn(dtype, b)) for b in ('xla', 'mkl')}
  times = {b: [] for b in runs}
  losses = {b: [] for b in runs}
  for run in runs.values():  # Compile and warm up.
    run[1], m = run[0](run[1], run[2])
    jax.block_until_ready(m)
  for _ in range(rounds):
    for b, run in runs.items():
      for _ in range(steps):
        t = time.perf_counter()
        run[1], m = run[0](run[1], run[2])
        losses[b].append(float(m['loss']))
        times[b].append(time.perf_counter() - t)
  xla, mkl = (statistics.median(times[b]) * 1e3 for b in ('xla', 'mkl'))
  print(f'{dtype}: step xla {xla:.0f} ms, mkl {mkl:.0f} ms (median of '
        f'{rounds} x {steps} alternated); xla/mkl = {xla / mkl:.2f}; '
        f'last losses {losses["xla"][-1]:.4f} / {losses["mkl"][-1]:.4f}')


# (rows, in, out) of gpt2_small_cpu's dense layers: q/k/v/o, MLP up, MLP down, LM head.
_LAYER_SHAPES = ((2048, 512, 512), (2048, 512, 2048), (2048, 2048, 512), (2048, 512, 8192))


def layers(rounds: int) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from llm_jax.model import cpu_matmul  # pylint: disable=import-outside-toplevel
  print(f'oneMKL custom call available: {cpu_matmul.available()}')

  def train_fn(backend):
    def loss(x, w, b):
      y = cpu_matmul.matmul(x, w, backend=backend, preferred_element_type=jnp.float32)
      return jnp.sum(jnp.tanh(y + b))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

  def forward_fn(backend):
    return jax.jit(lambda x, w, b: cpu_matmul.matmul(
        x, w, backend=backend, preferred_element_type=jnp.float32))

  def rates(make, x, w, b, flops):
    fns = {backend: make(backend) for backend in ('xla', 'mkl')}
    times = {name: [] for name in fns}
    for fn in fns.values():
      jax.block_until_ready(fn(x, w, b))
    for _ in range(rounds):
      for name, fn in fns.items():
        for _ in range(3):
          t = time.perf_counter()
          jax.block_until_ready(fn(x, w, b))
          times[name].append(time.perf_counter() - t)
    return {name: flops / statistics.median(t) / 1e9 for name, t in times.items()}

  for m, k, n in _LAYER_SHAPES:
    x = jax.random.normal(jax.random.key(0), (m, k))
    w = 0.02 * jax.random.normal(jax.random.key(1), (k, n))
    b = jnp.zeros((n,))
    fwd = rates(forward_fn, x, w, b, 2 * m * k * n)
    both = rates(train_fn, x, w, b, 6 * m * k * n)
    print(f'{m}x{k}x{n} float32: forward jnp.dot {fwd["xla"]:4.0f} oneMKL {fwd["mkl"]:4.0f} '
          f'GFLOP/s ({fwd["mkl"] / fwd["xla"]:.2f}x); forward+backward jnp.dot '
          f'{both["xla"]:4.0f} oneMKL {both["mkl"]:4.0f} ({both["mkl"] / both["xla"]:.2f}x)')


TORCH_ATTENTION = """
import sys, time, statistics, torch
torch.set_num_threads(2)
torch.set_flush_denormal(True)
B, T, N, H = 8, 256, 8, 64
for name, dt in (('float32', torch.float32), ('bfloat16', torch.bfloat16)):
  q, k, v = (torch.randn(B, N, T, H, dtype=dt, requires_grad=True) for _ in range(3))
  g = torch.randn(B, N, T, H, dtype=dt)
  sdpa = torch.nn.functional.scaled_dot_product_attention
  def fwd():
    with torch.no_grad():
      sdpa(q, k, v, is_causal=True)
  def both():
    sdpa(q, k, v, is_causal=True).backward(g)
  for what, fn in (('forward', fwd), ('forward+backward', both)):
    fn()
    times = []
    for _ in range(int(sys.argv[1]) * 5):
      t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    print(name, what, statistics.median(times) * 1e3)
"""


def attention_layer(rounds: int) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from llm_jax.model import attention, cpu_attention  # pylint: disable=import-outside-toplevel
  B, T, N, H = 8, 256, 8, 64
  mask = attention.causal_mask(T)
  kinds = {'xla': lambda q, k, v: attention.xla_attend(q, k, v, mask),
           'fused': lambda q, k, v: cpu_attention.attend(q, k, v, mask, causal=True,
                                                         backend='mkl')}
  print(f'fused kernel available: {cpu_attention.use_kernel("mkl", jnp.float32)}')
  ours = {}
  for dtype in ('float32', 'bfloat16'):
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (B, T, N, H)).astype(dtype) for key in keys[:3])
    g = jax.random.normal(keys[3], (B, T, N, H))
    fns = {}
    for kind, fn in kinds.items():
      fns[kind, 'forward'] = jax.jit(fn)
      fns[kind, 'forward+backward'] = jax.jit(jax.grad(
          lambda q, k, v, fn=fn, g=g: jnp.sum(fn(q, k, v).astype(jnp.float32) * g),
          argnums=(0, 1, 2)))
    times = {key: [] for key in fns}
    for fn in fns.values():
      jax.block_until_ready(fn(q, k, v))
    for _ in range(rounds):
      for key, fn in fns.items():
        for _ in range(5):
          t = time.perf_counter()
          jax.block_until_ready(fn(q, k, v))
          times[key].append(time.perf_counter() - t)
    for (kind, what), t in times.items():
      ours[dtype, what, kind] = statistics.median(t) * 1e3
  torch_ms = {}
  try:
    out = subprocess.run([sys.executable, '-c', TORCH_ATTENTION, str(rounds)],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, 'OMP_WAIT_POLICY': 'PASSIVE'}).stdout
    for line in out.split('\n'):
      if line:
        dtype, what, value = line.split()
        torch_ms[dtype, what] = float(value)
  except (subprocess.CalledProcessError, FileNotFoundError) as e:
    print(f'torch not measured: {e}')
  for dtype in ('float32', 'bfloat16'):
    for what in ('forward', 'forward+backward'):
      xla, fused = ours[dtype, what, 'xla'], ours[dtype, what, 'fused']
      torch_part = (f'  torch SDPA {torch_ms[dtype, what]:6.1f} ms (fused {torch_ms[dtype, what] / fused:.2f}x)'
                    if (dtype, what) in torch_ms else '')
      print(f'{dtype:8s} {what:16s} xla_attend {xla:6.1f} ms  fused {fused:6.1f} ms '
            f'({xla / fused:.2f}x){torch_part}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('what', choices=('peak', 'step', 'layers', 'attention', 'adamw'))
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=3, help='steps per round (step)')
  parser.add_argument('--dtype', default='float32,bfloat16',
                      help='comma-separated compute dtypes (step)')
  args = parser.parse_args()
  print(f'load average {os.getloadavg()[0]:.2f}')
  if args.what == 'peak':
    peak(args.rounds)
  elif args.what == 'layers':
    layers(args.rounds)
  elif args.what == 'attention':
    attention_layer(args.rounds)
  elif args.what == 'adamw':
    adamw(args.dtype.split(','), args.rounds, args.steps)
  else:
    for dtype in args.dtype.split(','):
      step(dtype, args.rounds, args.steps)
  print(f'load average {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  main()
