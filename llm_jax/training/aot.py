"""Will it fit? Compile one train step ahead of time and report per-device memory.

``python -m llm_jax.train --config=... --dry_run`` lowers and compiles the real
train step for the configured mesh on this machine's devices, or, with
``--topology=v5p:2x2x1`` and libtpu installed, for a TPU slice that is not
here. Nothing is allocated or trained; the figures come from the compiled
program and from the shardings of the state.
"""

import math
import re

import jax
import jax.numpy as jnp

from llm_jax.data import batch as batch_lib
from llm_jax.training import objectives, sharding
from llm_jax.training import trainer
from llm_jax.core.errors import UserError

GIB = 2**30
# HBM per chip, for TPU topologies compiled from elsewhere (no live device to ask).
HBM_BY_KIND = (('v6', 32 * GIB), ('v5 lite', 16 * GIB), ('v5e', 16 * GIB),
               ('v5', 95 * GIB), ('v4', 32 * GIB))


def topology_devices(topology: str) -> list:
  """The devices of a TPU slice such as 'v5p:2x2x1' (needs libtpu)."""
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    return list(topologies.get_topology_desc(
        platform='tpu', topology_name=topology).devices)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(
        f'Cannot describe the TPU topology {topology!r} ({type(e).__name__}: '
        f'{str(e).splitlines()[0] if str(e) else ""}). It needs libtpu: '
        "pip install -e '.[tpu]'; names look like v5p:2x2x1 or v5e:4x4.") from e


def device_memory(device) -> float:
  """Bytes of memory one device has (nan where unknown, e.g. CPU)."""
  try:
    stats = device.memory_stats()
  except (AttributeError, jax.errors.JaxRuntimeError):
    stats = None  # A device of a topology compiled for, not attached here.
  if stats and 'bytes_limit' in stats:
    return float(stats['bytes_limit'])
  kind = device.device_kind.lower()
  for key, size in HBM_BY_KIND:
    if key in kind:
      return float(size)
  return float('nan')


def per_device_bytes(abstract_tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def batch_keys(objective) -> tuple[str, ...]:
  """The batch contract's keys the objective's train step reads."""
  if objective.is_pairwise:
    return ('inputs', 'targets', 'weights') + batch_lib.PAIR
  if isinstance(objective, objectives.Grpo):
    return ('inputs', 'targets', 'weights') + batch_lib.ROLLOUT
  return ('inputs', 'targets')


def dry_run(config, topology: str = '') -> dict:
  """Compiles one train step for the configured mesh; returns memory figures.

  The vocabulary is ``tokenizer.vocab_size`` (no data is read).
  """
  devices = topology_devices(topology) if topology else jax.devices()
  mesh = sharding.make_mesh(config.mesh, devices)
  tr = trainer.Trainer.build(config, config.tokenizer.vocab_size, mesh)
  state = tr.abstract_state()
  shape = (config.train.batch_size, config.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, batch_lib.DTYPES[k], sharding=tr.batch_sharding)
           for k in batch_keys(tr.objective)}
  report = {
      'devices': f'{len(devices)} x {devices[0].device_kind}',
      'mesh': dict(mesh.shape),
      'parameters': tr.model_cfg.num_params(),
      'params_bytes': per_device_bytes(state.params),
      'opt_state_bytes': per_device_bytes(state.opt_state),
      # DPO/GRPO's frozen reference copy (0 with LoRA: the base serves).
      'reference_bytes': (0 if state.ref_params is None
                          else per_device_bytes(state.ref_params)),
      'capacity_bytes': device_memory(devices[0]),
  }
  try:
    mem = tr.step_fn.lower(state, batch).compile().memory_analysis()
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses a program that cannot fit, saying how much its
    # temporaries need: that is the answer to the question asked.
    needed = re.search(r'temporaries \(([\d.]+)([KMGT])\)', str(e))
    if 'RESOURCE_EXHAUSTED' not in str(e) or not needed:
      raise
    temp = float(needed.group(1)) * 2**(10 * 'KMGT'.index(needed.group(2)) + 10)
    return {**report, 'temp_bytes': temp, 'fits': False,
            'peak_bytes': temp + report['params_bytes'] + report['opt_state_bytes']}
  report['temp_bytes'] = mem.temp_size_in_bytes
  report['peak_bytes'] = max(mem.peak_memory_in_bytes,
                             mem.argument_size_in_bytes + mem.temp_size_in_bytes)
  capacity = report['capacity_bytes']
  report['fits'] = (bool(report['peak_bytes'] <= capacity)
                    if math.isfinite(capacity) else None)
  return report


def format_report(r: dict) -> str:
  gib = lambda b: f'{b / GIB:8.3f} GiB'
  verdict = {True: 'FITS', False: 'DOES NOT FIT', None: 'capacity unknown'}[r['fits']]
  cap = gib(r['capacity_bytes']) if math.isfinite(r['capacity_bytes']) else '       ?'
  return '\n'.join([
      f'Dry run: one train step compiled for {r["devices"]}, mesh {r["mesh"]}, '
      f'{r["parameters"]:,} parameters.',
      'Per device:',
      f'  parameters        {gib(r["params_bytes"])}',
      f'  optimizer state   {gib(r["opt_state_bytes"])}',
  ] + ([f'  reference copy    {gib(r["reference_bytes"])}'] if r['reference_bytes'] else []) + [
      f'  temporaries       {gib(r["temp_bytes"])}',
      f'  peak (compiled)   {gib(r["peak_bytes"])}   of {cap}: {verdict}',
  ] + ([] if r['fits'] is not False else [
      '  To fit: raise optim.grad_accum_steps (smaller micro-batches), add '
      'devices to mesh.fsdp, or shorten data.seq_len.']))
