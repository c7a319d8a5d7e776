"""Starting a run from existing weights: ``config.init_from``.

``init_state`` builds a fresh run's ``TrainState`` whose parameters come from
another run's (or an imported) checkpoint, with this run's own optimizer
state, schedule and data. The parameter shapes must match; LoRA adapters
(``llm_jax/model/lora.py``) keep their own fresh init. ``config_from`` makes
the config of a run that continues another (``configs/continued.py``),
holding a pruned source's zeros at zero (``prune.keep_zeros``).
"""

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.core.configuration import base_config
from llm_jax.core.errors import UserError
from llm_jax.model import heads, lora
from llm_jax.model import transformer as model_lib
from llm_jax.runs import workdir as workdir_lib
from llm_jax.training import checkpoint as ckpt_lib
from llm_jax.training import metrics, sparsity
from llm_jax.training.checkpoint import flatten_params, unflatten_like

# Model keys that change how the model computes, never its function or shapes.
_COMPUTE_ONLY = ('dtype', 'remat', 'attention', 'scan_layers')


def resolve(init_from: str) -> tuple[str, int | None]:
  """(workdir, step) of ``init_from``: a workdir, or a step directory in one."""
  path = os.path.abspath(os.path.expanduser(init_from))
  name, parent = os.path.basename(path), os.path.dirname(path)
  if name.isdigit() and os.path.basename(parent) == 'checkpoints':
    return os.path.dirname(parent), int(name)
  return path, None


def source_tokenizer(init_from: str) -> str | None:
  """The path of the source run's tokenizer file, or None if it has none."""
  workdir, _ = resolve(init_from)
  workdir_lib.read_config(workdir)  # A clear error if it is not a run directory.
  return workdir_lib.tokenizer_path(workdir)


def use_source_tokenizer(config) -> None:
  """With ``init_from`` and no ``tokenizer.path``, uses the source's tokenizer.

  The new run must encode text with the ids its starting weights learnt
  (a SentencePiece tokenizer.model or a Hugging Face tokenizer.json); a
  source without one (an import of weights alone) needs one given.
  """
  if not config.init_from or config.tokenizer.path:
    return
  path = source_tokenizer(config.init_from)
  if path is None:
    raise UserError(
        f'init_from={config.init_from} has no tokenizer (an import of weights '
        'without tokenizer files). Set --config.tokenizer.path to a tokenizer '
        'with the same ids.')
  config.tokenizer.path = path


def source_vocab_size(init_from: str) -> int:
  """The vocabulary the source's checkpoint was saved with (its model's rows)."""
  workdir, step = resolve(init_from)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, workdir_lib.CHECKPOINTS_DIR),
                               every=0, keep=1_000_000)
  try:
    return int(ckpt.metadata(workdir_lib.latest_step(workdir) if step is None else step)
               ['vocab_size'])
  finally:
    ckpt.close()


# An LM's output parameters, which a task head replaces (init_from leaves them).
_LM_ONLY = ('lm_head/', 'mlm_head/')


def _model_differences(source_cfg, target_cfg) -> list[str]:
  out = []
  for field in dataclasses.fields(target_cfg):
    a = getattr(source_cfg, field.name, None)
    b = getattr(target_cfg, field.name)
    if field.name not in _COMPUTE_ONLY and a != b:
      key = field.name if field.name in ('vocab_size', 'max_len') else f'model.{field.name}'
      out.append(f'{key}: {a!r} there, {b!r} here')
  return out


def check_fits(source_flat: dict, target_flat: dict, source_cfg, target_cfg,
               where: str) -> None:
  """Raises UserError naming the first parameter that does not fit."""
  diffs = _model_differences(source_cfg, target_cfg)
  why = f' (model differences: {"; ".join(diffs)})' if diffs else ''
  for path, spec in target_flat.items():
    if _fresh(path, source_flat):
      continue
    if path not in source_flat:
      raise UserError(f'init_from={where} has no parameter {path}{why}. Use the '
                      'same model config as the source run.')
    if tuple(source_flat[path].shape) != tuple(spec.shape):
      raise UserError(f'init_from={where}: parameter {path} has shape '
                      f'{list(source_flat[path].shape)} there but '
                      f'{list(spec.shape)} here{why}. Use the same model config '
                      'as the source run.')
  # A head the source has and this model lacks (a reward model's) stays behind,
  # as does a source's LM head where a task head replaces it.
  extra = sorted(p for p in set(source_flat) - set(target_flat)
                 if not (heads.is_head_path(p)
                         or (target_cfg.head != 'lm' and p.startswith(_LM_ONLY))))
  if extra:
    raise UserError(f'init_from={where} has parameter {extra[0]}, which this '
                    f'model lacks{why}. Use the same model config as the source run.')
  if diffs:
    logging.warning('init_from=%s: same shapes, but the model config differs: %s',
                    where, '; '.join(diffs))


def init_state(trainer, init_from: str):
  """A fresh TrainState whose (non-adapter) parameters come from ``init_from``."""
  workdir, step = resolve(init_from)
  run = workdir_lib.load(workdir, step)
  params = run.params  # Unrolled blocks: workdir.load unstacks a scanned run.
  if any('/lora_' in k for k in flatten_params(params)):
    params = lora.merge(params, run.config.lora)
  if trainer.model_cfg.scan_layers:
    params = model_lib.stack_blocks(params)
  source = flatten_params(params)
  abstract = trainer.abstract_state().params
  target = flatten_params(abstract)
  check_fits(source, target, run.model_cfg, trainer.model_cfg, init_from)
  state = trainer.init_fn()
  fresh = flatten_params(state.params)
  def place(value, spec):
    # From a host copy, each device taking its own slice: no device needs
    # the whole array, and it works where the mesh spans several hosts.
    host = np.asarray(jax.device_get(value))
    return jax.make_array_from_callback(host.shape, spec.sharding, lambda i: host[i])

  merged = {path: (fresh[path] if _fresh(path, source) else place(source[path], spec))
            for path, spec in target.items()}
  metrics.say(f'Initialised from {workdir} (step {run.step}); optimizer state, '
              'schedule and data are this run\'s own.')
  params = unflatten_like(merged, abstract)
  # The optimizer state of the weights the run starts from: with
  # prune.keep_zeros it records which of them are zero (training/sparsity.py).
  opt_state = jax.jit(trainer.tx.init,
                      out_shardings=trainer.state_shardings.opt_state)(params)
  if sparsity.keeps_zeros(trainer.config):
    metrics.say(f'prune.keep_zeros: {sparsity.count(params)["prunable_zeros"]:,} '
                'zero kernel weights stay zero.')
  state = state.replace(params=params, opt_state=opt_state)
  if state.ref_params is not None:  # DPO/GRPO's frozen reference: the start.
    params_shardings = jax.tree.map(lambda s: s.sharding, abstract)
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=params_shardings)
    state = state.replace(ref_params=copy(params))
  return state


def _fresh(path: str, source: dict) -> bool:
  """Parameters a run initialises itself: LoRA adapters, and a head the source lacks."""
  return '/lora_' in path or (heads.is_head_path(path) and path not in source)


def config_from(init_from: str, base=None, *, with_template: bool = False):
  """A config that continues ``init_from``: its model, this run's everything else.

  The model section (and, for a learned position table, ``data.seq_len``) is
  the source run's; ``init_from`` is set; data, optimizer and schedule are
  ``base``'s (configs/base.py by default), to override on the command line.
  ``with_template`` also takes the source's ``sft.template`` (alignment
  after SFT renders conversations as the model learnt them).
  """
  config = base_config() if base is None else base
  if not init_from:
    return config  # `--help` and the key checks load presets without one.
  workdir, _ = resolve(init_from)
  source = workdir_lib.read_config(workdir)
  for key in config.model.keys():
    if key in source.model:
      config.model[key] = source.model[key]
  # A pruned source keeps its zeros (python -m llm_jax.prune sets this).
  config.prune.keep_zeros = sparsity.keeps_zeros(source)
  if source.model.position == 'learned' or source.data.seq_len < config.data.seq_len:
    config.data.seq_len = source.data.seq_len
  if with_template and 'sft' in source:
    config.sft.template = source.sft.template
  config.init_from = init_from
  config.name = f'{os.path.basename(workdir)}-continued'
  return config


