"""Dense 2-D matmuls on CPU through oneMKL (``config.model.cpu_matmul``).

XLA:CPU's dot does not use the AMX tiles of recent Xeons, and its bf16 dot is
no faster than its fp32 one; oneMKL's ``cblas_gemm_bf16bf16f32`` uses AMX and
its ``cblas_sgemm`` matches PyTorch's (docs/performance.md, "Matmuls on CPU").
``matmul`` runs ``x @ w`` through a ``jax.ffi`` custom call into oneMKL where
that pays and falls back to ``jnp.dot`` everywhere else:

* on TPU/GPU: the choice is made per platform when the step is lowered
  (``jax.lax.platform_dependent``), so a GPU or TPU never sees the call;
* when the library cannot be built (no compiler, no ``mkl``/``mkl-include``
  wheels): one warning, then ``jnp.dot``, which gives the same numbers;
* for dtypes other than float32/bfloat16.

The C++ sources (``csrc/cpu_matmul.cc`` and the attention kernel's
``csrc/cpu_attention.cc``) are compiled on first use into a
per-user cache directory keyed by a hash of the source, the compiler, jaxlib
and MKL versions and the CPU (it is built for this CPU's vector units:
``-march=native``; ``$LLM_JAX_CACHE`` or ``~/.cache/llm_jax``), under a file
lock, and renamed into place whole.

Gradients go through the same call (``dx = g @ w.T``, ``dw = x.T @ g``, with
transposes passed as flags, not copies). Under ``jit`` on a device mesh each
device multiplies its own shards (``custom_partitioning``): rows of ``x`` and
columns of ``w`` stay split as they come; a split contracted axis (the batch
rows in ``dw`` of a data-parallel step) is summed across devices with ``psum``.
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_jax.core import files, host

# config.model.cpu_matmul values: 'xla' (always jnp.dot), 'mkl' (the custom
# call on CPU; a warning and jnp.dot if it cannot be built) or 'auto' (the
# custom call on CPU hosts, where it measured faster in both dtypes).
BACKENDS = ('auto', 'xla', 'mkl')
_TARGET = 'llm_jax_cpu_matmul'
# One library holds every CPU kernel: this file's matmul, the fused attention
# of llm_jax/model/cpu_attention.py and the AdamW update of
# llm_jax/training/fused_adamw.py.
_SOURCES = tuple(os.path.join(os.path.dirname(__file__), 'csrc', name)
                 for name in ('cpu_matmul.cc', 'cpu_attention.cc', 'cpu_adamw.cc'))
# FFI target names and the symbols that implement them.
_TARGETS = {_TARGET: 'LlmJaxCpuMatmul',
            'llm_jax_cpu_attention_fwd': 'LlmJaxCpuAttentionFwd',
            'llm_jax_cpu_attention_bwd': 'LlmJaxCpuAttentionBwd',
            'llm_jax_cpu_adamw': 'LlmJaxCpuAdamW'}
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# Flags that let the elementwise loops vectorise without changing a result:
# -fno-math-errno (std::sqrt then need not set errno, so the AdamW loop is not
# a call per element: 172 against 60 ms for 23.2M parameters on one EPYC
# core); -fno-trapping-math (no floating-point exception is watched, so the
# softmax loops' selects may compute both sides: with AVX2 they were scalar);
# -march=native (this CPU's vector width, AVX2 or AVX-512: 60 -> 29 ms more;
# the build is cached per CPU, its flags are in the cache key). And
# -ffp-contract=off: no fused multiply-adds where the source has a product and
# a sum (GCC fuses them by default where the CPU has FMA), so the results do
# not depend on the ISA and the AdamW update stays Optax's arithmetic.
_CXXFLAGS = ('-O3', '-fopenmp-simd', '-fno-math-errno', '-fno-trapping-math', '-ffp-contract=off',
             '-march=native', '-std=c++17', '-shared', '-fPIC', '-pthread')


def _cache_root() -> str:
  root = os.environ.get('LLM_JAX_CACHE') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'llm_jax')
  return os.path.join(root, 'cpu_matmul')


def _mkl_paths() -> tuple[str, str, str]:
  """``(libmkl_rt path, include dir, version)`` from the pip wheels.

  Raises:
    RuntimeError: the ``mkl`` or ``mkl-include`` wheel is missing.
  """
  try:
    lib = [f for f in importlib.metadata.files('mkl') or ()
           if f.name.startswith('libmkl_rt.so')]
    hdr = [f for f in importlib.metadata.files('mkl-include') or ()
           if f.name == 'mkl.h']
  except importlib.metadata.PackageNotFoundError as e:
    raise RuntimeError(f'the {e.name} wheel is not installed') from e
  if not lib or not hdr:
    raise RuntimeError('the mkl wheels hold no libmkl_rt.so or mkl.h')
  lib_path = str(min(lib, key=lambda f: len(f.name)).locate())
  include = os.path.dirname(str(hdr[0].locate()))
  return os.path.realpath(lib_path), include, importlib.metadata.version('mkl')


def _compiler() -> str:
  cxx = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
  if not cxx:
    raise RuntimeError('no C++ compiler (g++) on PATH')
  return cxx


def _build(cxx: str, mkl_lib: str, mkl_include: str, out: str) -> None:
  """Compiles the custom call into ``out``, whole or not at all."""
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(out))
  os.close(fd)
  cmd = [cxx, *_CXXFLAGS, '-I', jax.ffi.include_dir(), '-I', mkl_include, *_SOURCES, mkl_lib,
         f'-Wl,-rpath,{os.path.dirname(mkl_lib)}', '-o', tmp]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
      raise RuntimeError(f'{cxx} failed: {proc.stderr.strip()[-400:]}')
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _library_path() -> str:
  """The compiled library for this source, compiler, jaxlib, MKL and CPU (built once)."""
  mkl_lib, mkl_include, mkl_version = _mkl_paths()
  cxx = _compiler()
  source = b''
  for path in _SOURCES:
    with open(path, 'rb') as f:
      source += f.read()
  version = subprocess.run([cxx, '--version'], capture_output=True, text=True,
                           check=False).stdout.split('\n')[0]
  cpu = ' '.join(sorted(host.cpu_flags() or ())) + host.cpu_model()
  key = hashlib.sha256(b'\0'.join([
      source, ' '.join(_CXXFLAGS).encode(), version.encode(), importlib.metadata.version('jaxlib').encode(),
      mkl_version.encode(), mkl_lib.encode(), cpu.encode()])).hexdigest()[:16]
  out = os.path.join(_cache_root(), key, 'cpu_matmul.so')
  if not os.path.exists(out):
    lock = files.FileLock(os.path.join(_cache_root(), key + '.lock'))
    lock.acquire(note=f'pid {os.getpid()} building {out}')
    try:
      if not os.path.exists(out):  # Another process may have built it meanwhile.
        os.makedirs(os.path.dirname(out), exist_ok=True)
        _build(cxx, mkl_lib, mkl_include, out)
    finally:
      lock.release()
  return out


@functools.cache
def available() -> bool:
  """Builds and registers the custom call once; False (after one warning) if it cannot."""
  # oneMKL's OpenMP threads otherwise spin for 200 ms after each threaded call
  # (KMP_BLOCKTIME), taking the cores from XLA's own threads: the bf16 step of
  # gpt2_small_cpu took 1,221 ms with them spinning and 876 ms without
  # (docs/performance.md). Set before the OpenMP runtime starts; a user's own
  # value wins.
  os.environ.setdefault('KMP_BLOCKTIME', '0')
  try:
    lib = ctypes.cdll.LoadLibrary(_library_path())
    for target, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform='cpu')
  except (OSError, RuntimeError, AttributeError) as e:
    logging.warning('model.cpu_matmul: oneMKL matmul unavailable (%s); using '
                    "XLA's dot (same results, slower on CPU).", e)
    return False
  return True


# ---- The custom call and its partitioning over a device mesh.


def _ffi(x, w, transpose_x: bool, transpose_w: bool) -> jax.Array:
  """``op(x) @ op(w)`` in float32 through oneMKL, on this device's arrays."""
  m = x.shape[-1] if transpose_x else x.shape[-2]
  n = w.shape[-2] if transpose_w else w.shape[-1]
  out = jax.ShapeDtypeStruct(x.shape[:-2] + (m, n), jnp.float32)
  # 'broadcast_all': under vmap (of this call alone; the partitioned op
  # batches through XLA) both operands get the batch axis the C++ loops over.
  call = jax.ffi.ffi_call(_TARGET, out, vmap_method='broadcast_all')
  return call(x, w, transpose_x=transpose_x, transpose_w=transpose_w)


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _plan(mesh, x_spec, w_spec, tx: bool, tw: bool):
  """Mesh axes of (rows M, columns N, contracted K), pairwise disjoint.

  M keeps x's split, N keeps w's split (minus axes M took), K keeps x's split
  (minus both); w is resharded to match, which for FSDP all-gathers it.
  """
  x_spec = tuple(x_spec) + (None,) * (2 - len(x_spec))
  w_spec = tuple(w_spec) + (None,) * (2 - len(w_spec))
  m = _axes(x_spec[1] if tx else x_spec[0])
  n = tuple(a for a in _axes(w_spec[0] if tw else w_spec[1]) if a not in m)
  k = tuple(a for a in _axes(x_spec[0] if tx else x_spec[1])
            if a not in m and a not in n)
  del mesh
  return m, n, k


def _spec(axes: tuple[str, ...]):
  return axes if len(axes) > 1 else (axes[0] if axes else None)


def _shardings(mesh, m, n, k, tx: bool, tw: bool):
  x = P(_spec(k), _spec(m)) if tx else P(_spec(m), _spec(k))
  w = P(_spec(n), _spec(k)) if tw else P(_spec(k), _spec(n))
  y = P(_spec(m), _spec(n))
  return (NamedSharding(mesh, x), NamedSharding(mesh, w)), NamedSharding(mesh, y)


def _specs_of(arg_shapes):
  specs = []
  for a in arg_shapes:
    sharding = a.sharding
    specs.append(sharding.spec if isinstance(sharding, NamedSharding) else P())
  return specs


def _infer(tx, tw, mesh, arg_shapes, result_shape):
  del result_shape
  m, n, k = _plan(mesh, *_specs_of(arg_shapes), tx, tw)
  return _shardings(mesh, m, n, k, tx, tw)[1]


def _partition(tx, tw, mesh, arg_shapes, result_shape):
  del result_shape
  m, n, k = _plan(mesh, *_specs_of(arg_shapes), tx, tw)
  arg_shardings, out_sharding = _shardings(mesh, m, n, k, tx, tw)

  def lower(x, w):
    y = _ffi(x, w, tx, tw)
    # A split contracted axis leaves partial sums on each device.
    return jax.lax.psum(y, k) if k else y

  return mesh, lower, out_sharding, arg_shardings


def _rule(tx: bool, tw: bool) -> str:
  x = 'k m' if tx else 'm k'
  w = 'n k' if tw else 'k n'
  return f'{x}, {w} -> m n'


def _batched_xla(tx: bool, tw: bool, axis_size, in_batched, x, w):
  """Under ``vmap``: XLA's batched dot (custom_partitioning has no batching rule)."""
  x = x if in_batched[0] else jnp.broadcast_to(x, (axis_size,) + x.shape)
  w = w if in_batched[1] else jnp.broadcast_to(w, (axis_size,) + w.shape)
  dims = (((1 if tx else 2,), (2 if tw else 1,)), ((0,), (0,)))
  return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32), True


@functools.cache
def _partitioned(tx: bool, tw: bool):
  """The custom call for one transpose setting, partitioned per device."""
  op = custom_partitioning(lambda x, w: _ffi(x, w, tx, tw))
  op.def_partition(
      partition=functools.partial(_partition, tx, tw),
      infer_sharding_from_operands=functools.partial(_infer, tx, tw),
      sharding_rule=_rule(tx, tw), reduction_factors=('k',))
  batchable = jax.custom_batching.custom_vmap(op)
  batchable.def_vmap(functools.partial(_batched_xla, tx, tw))
  return batchable


# ---- The differentiable product.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mkl_matmul(x, w, transpose_w: bool):
  """``x @ w`` (``w``: ``[K, N]``) or ``x @ w.T`` (``transpose_w``, ``w``: ``[N, K]``)."""
  return _partitioned(False, transpose_w)(x, w)


def _fwd(x, w, transpose_w):
  return _mkl_matmul(x, w, transpose_w), (x, w)


def _bwd(transpose_w, res, g_MN):
  x_MK, w = res
  # bf16 operands: the float32 cotangent is rounded to bf16 for the product
  # (as torch.autocast does); where the layer's output was rounded to bf16
  # anyway (every Dense but the LM head) this loses nothing.
  g_MN = g_MN.astype(x_MK.dtype)
  if transpose_w:  # w_NK: dx = g . w, dw = g^T . x, both in w's own layout.
    dx_MK = _partitioned(False, False)(g_MN, w)
    dw = _partitioned(True, False)(g_MN, x_MK)
  else:  # w_KN: dx = g . w^T, dw = x^T . g.
    dx_MK = _partitioned(False, True)(g_MN, w)
    dw = _partitioned(True, False)(x_MK, g_MN)
  return dx_MK.astype(x_MK.dtype), dw.astype(w.dtype)


_mkl_matmul.defvjp(_fwd, _bwd)


# 'auto' leaves products of fewer rows to XLA's dot: a decoding step's
# [batch, D] x [D, N] is too small for a call that wakes oneMKL's threads
# (batch-1 float32 decoding of configs/base.py ran at 663 tokens/s through
# oneMKL against 8,957 through XLA's dot). A train step has batch x sequence rows.
AUTO_MIN_ROWS = 64


def cpu_has_bf16_units(cpuinfo: str = host.CPUINFO) -> bool | None:
  """Whether this CPU multiplies bf16 natively: AMX or AVX-512 BF16 (None: unknown).

  Without either, oneMKL and XLA both emulate bf16 products: on a 2-core AMD
  EPYC with AVX2 only, gpt2_small_cpu's bf16 step took 1.1x its float32 time
  (docs/performance.md, "On an AMD EPYC with AVX2").
  """
  flags = host.cpu_flags(cpuinfo)
  return None if flags is None else host.has_bf16_units(flags)


def warn_if_bf16_is_emulated(dtype, cpuinfo: str = host.CPUINFO) -> bool:
  """Logs one warning when ``dtype`` is bfloat16 on a CPU host without bf16 units."""
  if (jnp.dtype(dtype) != jnp.bfloat16 or jax.default_backend() != 'cpu'
      or cpu_has_bf16_units(cpuinfo) is not False):
    return False
  logging.warning(
      'model.dtype=bfloat16 on a CPU without bf16 units (neither AMX nor AVX-512 BF16 '
      'is listed in %s): its bf16 products are emulated, so a step is slower than in '
      'float32 (1.1x slower on a 2-core AVX2 EPYC). For speed on this machine, set '
      '--config.model.dtype=float32.', cpuinfo)
  return True


def use_mkl(backend: str, dtype) -> bool:
  """Whether ``backend`` (a ``model.cpu_matmul`` value) runs ``dtype`` through oneMKL.

  'auto' means a CPU host: there oneMKL made the gpt2_small_cpu train step
  1.2-1.6x faster in bfloat16 (AMX) and about 1.05x in float32 on an idle
  machine (docs/performance.md, "Matmuls on CPU"). A GPU or TPU host does not
  even build the library.
  """
  dtype = jnp.dtype(dtype)
  if backend == 'xla' or dtype not in _DTYPES:
    return False
  if backend == 'auto' and jax.default_backend() != 'cpu':
    return False
  return available()


def matmul(x_MK: jax.Array, w_KN: jax.Array, *, backend: str = 'xla',
           preferred_element_type=None, transpose_w: bool = False) -> jax.Array:
  """``x_MK @ w_KN`` through oneMKL on CPU, ``jnp.dot`` elsewhere.

  Args:
    x_MK: ``[M, K]``, float32 or bfloat16.
    w_KN: ``[K, N]``, the same dtype as ``x_MK``; ``[N, K]`` with
      ``transpose_w``.
    backend: ``config.model.cpu_matmul``: 'xla' is always ``jnp.dot``;
      'mkl' uses oneMKL when the devices are CPUs and it built; 'auto' does
      so on a CPU host (``use_mkl``) for products of ``AUTO_MIN_ROWS`` rows
      or more.
    preferred_element_type: the result dtype (default: the operands'); the
      oneMKL path accumulates in float32 and rounds once to it.
    transpose_w: multiply by ``w``'s transpose, read in place (oneMKL's
      transpose flag, in the gradients too), e.g. the tied LM head's
      ``x @ table.T``: no transposed copy of the table is made.

  Returns:
    ``[M, N]`` in ``preferred_element_type``.
  """
  out_dtype = jnp.dtype(preferred_element_type or x_MK.dtype)

  def xla(x, w):
    return jnp.dot(x, w.T if transpose_w else w, preferred_element_type=out_dtype)

  if (x_MK.ndim != 2 or w_KN.ndim != 2 or x_MK.dtype != w_KN.dtype
      or not use_mkl(backend, x_MK.dtype)
      or (backend == 'auto' and x_MK.shape[0] < AUTO_MIN_ROWS)):
    return xla(x_MK, w_KN)

  def mkl(x, w):
    return _mkl_matmul(x, w, transpose_w).astype(out_dtype)

  return jax.lax.platform_dependent(x_MK, w_KN, cpu=mkl, default=xla)

