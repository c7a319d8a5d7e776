"""The device mesh, logical-axis rules, and the shardings of state and batch.

Parameters name their axes (``('embed', 'mlp')``, see ``model.py``); the rules
in ``config.mesh.rules`` map each name to a mesh axis (``data``, ``fsdp``,
``tensor``) or to ``None`` (replicated). Everything that places arrays on
devices goes through here, so one code path serves one CPU, a GPU box and a
TPU pod slice.
"""

from collections.abc import Mapping, Sequence
import math
import os
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax

from llm_jax.core.errors import UserError

MESH_AXES = ('data', 'fsdp', 'tensor')


def initialize_distributed(coordinator: str = '', num_processes: int = 0,
                           process_id: int = -1) -> None:
  """Joins a multi-host job through JAX's own runtime, when there is one.

  Explicit settings (arguments, else $LLM_JAX_COORDINATOR,
  $LLM_JAX_NUM_PROCESSES, $LLM_JAX_PROCESS_ID) win. Otherwise
  $LLM_JAX_DISTRIBUTED=1 (set by launch/ scripts), a SLURM job with several
  tasks, a GKE TPU pod or a multislice job lets JAX detect the cluster. A
  single machine needs nothing. Must run before anything touches a device.
  """
  env = os.environ
  coordinator = coordinator or env.get('LLM_JAX_COORDINATOR', '')
  num_processes = num_processes or int(env.get('LLM_JAX_NUM_PROCESSES', '0'))
  if process_id < 0:
    process_id = int(env.get('LLM_JAX_PROCESS_ID', '-1'))
  if coordinator:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise UserError(
          f'With a coordinator ({coordinator}) give the number of processes and '
          f'this process id in [0, N): got num_processes={num_processes}, '
          f'process_id={process_id}.')
    # CPU devices need a collectives backend for arrays that span processes;
    # the setting affects nothing else, so GPU/TPU hosts may have it too.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif (env.get('LLM_JAX_DISTRIBUTED') == '1'
        or int(env.get('SLURM_NTASKS', '1')) > 1
        or ',' in env.get('TPU_WORKER_HOSTNAMES', '')
        or 'MEGASCALE_COORDINATOR_ADDRESS' in env):
    # JAX finds the coordinator and this process's id itself (TPU metadata
    # server, SLURM variables, Megascale); launch/ scripts set the first flag.
    jax.distributed.initialize()


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolves the configured (data, fsdp, tensor) sizes; one -1 fills the rest."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  desc = ', '.join(f'mesh.{a}={s}' for a, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1:
    raise UserError(f'Only one mesh axis may be -1 (got {desc}).')
  if any(s == 0 or s < -1 for s in sizes):
    raise UserError(f'Mesh sizes must be positive or -1 (got {desc}).')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise UserError(
          f'The mesh ({desc}) does not divide the {num_devices} devices: the '
          f'fixed axes multiply to {known}. Pick sizes whose product divides '
          f'{num_devices}.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise UserError(
        f'The mesh ({desc}) has {math.prod(sizes)} slots but there are '
        f'{num_devices} devices. Make the product equal {num_devices} or set one '
        'axis to -1.')
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh over all devices (or the given ones).

  ``jax.make_mesh`` orders devices so the last axis (``tensor``, the one with
  the most traffic) lands on the fastest interconnect.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _rules(rules) -> dict[str, Any]:
  return {name: axis for name, axis in rules}


def logical_to_spec(names: Sequence[str | None] | None, rules) -> P:
  """Maps logical axis names to a PartitionSpec; unknown names raise.

  A mesh axis may appear only once in a spec, so a later dimension that maps
  to an axis already used stays replicated.
  """
  if names is None:
    return P()
  table = _rules(rules)
  used: set[str] = set()
  spec = []
  for name in names:
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise UserError(
          f'No rule in config.mesh.rules for the logical axis {name!r}; add '
          f'({name!r}, <mesh axis or None>) to the rules.')
    axis = table[name]
    axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def param_names(abstract_state) -> Any:
  """The logical axis names of each parameter, as a pure-dict tree of tuples."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def names(v):
    return tuple(v.get_metadata().get('out_sharding') or (None,) * len(v.shape))

  return nnx.to_pure_dict(jax.tree.map(
      names, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def tree_shardings(names_tree, mesh: Mesh, rules):
  """NamedShardings for a tree whose leaves are logical-name tuples."""
  return jax.tree.map(
      lambda n: NamedSharding(mesh, logical_to_spec(n, rules)), names_tree,
      is_leaf=lambda x: isinstance(x, tuple))


def check_divisible(abstract_params, names_tree, mesh: Mesh, rules) -> None:
  """Every sharded dimension must split evenly over its mesh axes.

  Raises:
    UserError: naming the parameter, its dimension and the mesh axes, e.g. a
      tensor axis of 3 for 4 attention heads.
  """
  flat_shapes = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_names = jax.tree.leaves(names_tree, is_leaf=lambda x: isinstance(x, tuple))
  for (path, leaf), names in zip(flat_shapes, flat_names):
    spec = logical_to_spec(names, rules)
    for size, axes, name in zip(leaf.shape, spec, names):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      ways = math.prod(mesh.shape[a] for a in axes)
      if size % ways:
        where = '/'.join(str(getattr(k, 'key', k)) for k in path)
        raise UserError(
            f'Parameter {where} has {size} along its {name!r} axis, which the '
            f'mesh splits {ways} ways over {"x".join(axes)} '
            f'({", ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)}); pick mesh '
            f'sizes that divide {size}.')


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state,
                        params_shardings, mesh: Mesh):
  """Optimizer moments shard like their parameters; counters are replicated."""
  replicated = NamedSharding(mesh, P())
  # A params-shaped state may hold a scalar in place of a parameter (the keep
  # masks of training/sparsity.py do, for parameters that are never pruned).
  return optax.tree_map_params(
      tx, lambda v, s: s if getattr(v, 'ndim', 1) else replicated,
      abstract_opt_state, params_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sequences split over the 'batch' rule's axes; the time axis is whole."""
  return NamedSharding(mesh, logical_to_spec(('batch', None), rules))


def batch_divisor(mesh: Mesh, rules) -> int:
  """How many ways the batch dimension is split (global batch must divide)."""
  spec = logical_to_spec(('batch',), rules)[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return math.prod(mesh.shape[a] for a in axes)


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding):
  """Assembles this host's rows into global arrays (each host reads a slice)."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def addressable_bytes(tree) -> int:
  """Bytes of ``tree`` held on this process's first device."""
  dev = jax.local_devices()[0]
  total = 0
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      if shard.device == dev:
        total += shard.data.size * shard.data.dtype.itemsize
  return total
