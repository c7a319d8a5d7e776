"""AdamW as one custom call per parameter on CPU (``config.model.cpu_matmul``).

XLA:CPU runs Optax's AdamW (``optim.make_optimizer``) as several loop fusions
per parameter, each recomputing the new moments from the old ones; since the
donated moments are updated in place, XLA copies every old moment first. On
gpt2_small_cpu the optimizer then took about 7% of the float32 step
(docs/performance.md). ``make_update`` returns an update that runs, on CPU
devices, one call per parameter (``csrc/cpu_adamw.cc``): it reads the
parameter, its gradient and both moments once and writes the three results in
place, with Optax's arithmetic operation for operation and the step's
non-finite guard inside.

Everything else is Optax's: the state keeps Optax's layout (checkpoints do not
change), the step counts come from ``tx.update``, and on GPU/TPU (the choice
is made per platform when the step is lowered: ``jax.lax.platform_dependent``)
or where the library could not be built, Optax's results are used as they are.
The call is partitioned (``custom_partitioning``: each device its own shards),
but runs only on one-device meshes for now (``make_update``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_jax.model import cpu_matmul
from llm_jax.model import lora
from llm_jax.training import optim
from llm_jax.training import sparsity

TARGET = 'llm_jax_cpu_adamw'
_MOMENT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def make_update(config, schedule, mesh=None):
  """``update(tx, grads, opt_state, params, grad_norm, finite) -> (params, opt_state)``, or None.

  None where the fused update does not apply: ``model.cpu_matmul='xla'``, an
  accelerator host with 'auto', LoRA or kept-zero pruning (their optimizers
  wrap this one), a ``mesh`` of more than one device, or the library could
  not be built. (On an 8-device CPU mesh a QA fine-tuning run ended at 77.5
  exact match with it against 100 with Optax's update. Step by step the two
  differ only in parameters whose true gradient is zero, such as the key
  biases and the span head's bias, where Adam scales rounding noise up to
  full-size steps, and the same run with ``model.cpu_matmul='xla'`` on one
  device also ends at 78; still, meshes keep Optax's update until a test
  that is not on that edge says otherwise.) ``schedule`` is the
  optimizer's learning-rate schedule (``optim.learning_rate_schedule``);
  ``tx`` is ``optim.make_optimizer``'s AdamW, whose state the update keeps.
  """
  if lora.enabled(config) or sparsity.keeps_zeros(config):
    return None
  if mesh is not None and mesh.size > 1:
    return None
  # The same rule as the dense layers' (xla, an accelerator host, no library).
  if not cpu_matmul.use_mkl(config.model.cpu_matmul, jnp.float32):
    return None
  o = config.optim
  consts = dict(b1=float(o.b1), b2=float(o.b2), eps=float(o.eps), eps_root=0.0,
                weight_decay=float(o.weight_decay), max_norm=float(o.clip_norm))
  return functools.partial(_update, consts=consts, schedule=schedule)


def _is_adam(x) -> bool:
  return isinstance(x, optax.ScaleByAdamState)


def _find(tree, kind):
  found = [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kind))
           if isinstance(x, kind)]
  if len(found) != 1:
    raise ValueError(f'expected one {kind.__name__} in the optimizer state, found {len(found)}')
  return found[0]


def _update(tx, grads, opt_state, params, grad_norm, finite, *, consts, schedule):
  """One AdamW update, equal to ``tx.update`` + ``apply_updates`` + the finite guard."""
  # Optax's own update: its step counts always, its results wherever the
  # call does not run (other platforms, other dtypes).
  updates, ref_state = tx.update(grads, opt_state, params)
  ref_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
  ref_params = keep(ref_params, params)
  adam, ref_adam = _find(opt_state, optax.ScaleByAdamState), _find(ref_state, optax.ScaleByAdamState)
  sched = _find(opt_state, optax.ScaleByScheduleState)
  b1, b2 = consts['b1'], consts['b2']
  count_inc = optax.safe_increment(adam.count)
  # The scalars exactly as Optax computes them (optax.tree.bias_correction,
  # scale_by_learning_rate(flip_sign=True), clip_by_global_norm's trigger).
  scalars = jnp.stack([
      grad_norm.astype(jnp.float32),
      (-1 * schedule(sched.count)).astype(jnp.float32),
      (1 - b1**count_inc).astype(jnp.float32),
      (1 - b2**count_inc).astype(jnp.float32),
      finite.astype(jnp.float32),
      (jnp.logical_not(grad_norm < consts['max_norm']) if consts['max_norm'] > 0
       else jnp.zeros((), bool)).astype(jnp.float32)])
  decays = optim.weight_decay_mask(params)

  def leaf(p, g, mu, nu, decay, p_ref, mu_ref, nu_ref):
    if (p.dtype != jnp.float32 or g.dtype != jnp.float32 or p.ndim == 0
        or mu.dtype not in _MOMENT_DTYPES or nu.dtype != mu.dtype):
      return p_ref, mu_ref, nu_ref
    call = _op(p.ndim, _attrs(consts, decay))
    return jax.lax.platform_dependent(
        p, g, mu, nu, scalars, cpu=call, default=lambda *_: (p_ref, mu_ref, nu_ref))

  leaves, treedef = jax.tree.flatten(params)
  others = [treedef.flatten_up_to(t) for t in (
      grads, adam.mu, adam.nu, decays, ref_params, keep(ref_adam.mu, adam.mu),
      keep(ref_adam.nu, adam.nu))]
  out = [leaf(*args) for args in zip(leaves, *others)]
  new_params, new_mu, new_nu = (treedef.unflatten([o[i] for o in out]) for i in range(3))
  new_adam = optax.ScaleByAdamState(count=keep(ref_adam.count, adam.count),
                                    mu=new_mu, nu=new_nu)
  # Every other leaf of the state (step counts) as Optax has it, kept when
  # the step is not finite.
  new_state = jax.tree.map(
      lambda r, o: new_adam if _is_adam(r) else keep(r, o), ref_state, opt_state,
      is_leaf=_is_adam)
  return new_params, new_state


def _attrs(consts, decay: bool) -> tuple:
  f = np.float32
  return (('b1', f(consts['b1'])), ('one_minus_b1', f(1 - consts['b1'])),
          ('b2', f(consts['b2'])), ('one_minus_b2', f(1 - consts['b2'])),
          ('eps', f(consts['eps'])), ('eps_root', f(consts['eps_root'])),
          ('weight_decay', f(consts['weight_decay'] if decay else 0.0)),
          ('max_norm', f(consts['max_norm'])))


def _call(p, g, mu, nu, scalars, attrs):
  out = (jax.ShapeDtypeStruct(p.shape, p.dtype), jax.ShapeDtypeStruct(mu.shape, mu.dtype),
         jax.ShapeDtypeStruct(nu.shape, nu.dtype))
  return jax.ffi.ffi_call(TARGET, out, input_output_aliases={0: 0, 2: 1, 3: 2})(
      p, g, mu, nu, scalars, **dict(attrs))


@functools.cache
def _op(ndim: int, attrs: tuple):
  """The call for rank-``ndim`` parameters, partitioned as the parameter is."""
  op = custom_partitioning(lambda p, g, mu, nu, s: _call(p, g, mu, nu, s, attrs))

  def shardings(mesh, arg_shapes):
    spec = (arg_shapes[0].sharding.spec if isinstance(arg_shapes[0].sharding, NamedSharding)
            else P())
    return NamedSharding(mesh, spec), NamedSharding(mesh, P())

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    same, _ = shardings(mesh, arg_shapes)
    return same, same, same

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    same, rep = shardings(mesh, arg_shapes)
    lower = lambda p, g, mu, nu, s: _call(p, g, mu, nu, s, attrs)  # noqa: E731
    return mesh, lower, (same, same, same), (same, same, same, same, rep)

  dims = ' '.join(f'd{i}' for i in range(ndim))
  op.def_partition(partition=partition, infer_sharding_from_operands=infer,
                   sharding_rule=f'{dims}, {dims}, {dims}, {dims}, s -> {dims}, {dims}, {dims}')
  return op
