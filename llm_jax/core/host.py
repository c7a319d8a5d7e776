"""What this host's CPU is and can do, read from /proc/cpuinfo (no jax import).

Used by the oneMKL matmul's bf16 warning (llm_jax/model/cpu_matmul.py) and by
benchmarks/side_by_side.py, which must not import jax in its orchestrator.
"""

CPUINFO = '/proc/cpuinfo'
# Instructions that multiply bf16 natively. Without them oneMKL, XLA and
# PyTorch emulate bf16 products (docs/performance.md, "On an AMD EPYC with AVX2").
BF16_UNITS = frozenset({'amx_bf16', 'avx512_bf16'})


def _field(name: str, cpuinfo: str) -> str | None:
  """The value of the first ``name`` line of ``cpuinfo`` (None: no file or no line)."""
  try:
    with open(cpuinfo, encoding='utf-8') as f:
      for line in f:
        if line.startswith(name):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return None


def cpu_flags(cpuinfo: str = CPUINFO) -> set[str] | None:
  """The CPU's flags (None off Linux)."""
  flags = _field('flags', cpuinfo)
  return None if flags is None else set(flags.split())


def cpu_model(cpuinfo: str = CPUINFO) -> str:
  """The CPU's model name ('?' off Linux)."""
  return _field('model name', cpuinfo) or '?'


def has_bf16_units(flags) -> bool:
  """Whether ``flags`` include AMX or AVX-512 BF16."""
  return bool(BF16_UNITS & set(flags))
