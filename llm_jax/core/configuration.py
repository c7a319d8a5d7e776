"""Loading configs: the base config, key checks, and presets for notebooks.

``configs/base.py`` declares every key; presets start from ``base_config()``
and override only what differs. ``check_keys`` refuses keys the base does not
declare, which catches typos made in notebooks as the CLI catches them in flags.
"""

import importlib.util
import pathlib

from llm_jax.core.errors import UserError

CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[2] / 'configs'


def load_preset(path: str | pathlib.Path):
  """Runs ``get_config()`` of a config file (a path, or a name in configs/)."""
  path = pathlib.Path(path)
  if not path.suffix:
    path = CONFIGS_DIR / f'{path}.py'
  if not path.is_file():
    raise UserError(f'No config file at {path}. Pass a path such as configs/base.py.')
  spec = importlib.util.spec_from_file_location(f'llm_jax_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def base_config():
  """A fresh copy of configs/base.py's config, which declares every key."""
  return load_preset(CONFIGS_DIR / 'base.py')


def use_gpt2_architecture(config) -> None:
  """GPT-2's choices (as in RoBERTa): LayerNorm, learned positions, GELU MLP,
  biases, tied embeddings. Sizes are left to the preset."""
  m = config.model
  m.norm, m.position, m.mlp = 'layernorm', 'learned', 'gelu'
  m.use_bias, m.tie_embeddings, m.norm_eps = True, True, 1e-5


def use_bert_architecture(config) -> None:
  """BERT's choices: an encoder with post-norm LayerNorm blocks (the embeddings
  normed, no final norm), learned positions, a token-type table, exact GELU,
  biases, tied embeddings, LayerNorm epsilon 1e-12. Sizes are left to the preset."""
  m = config.model
  m.kind, m.norm_position, m.norm, m.position = 'encoder', 'post', 'layernorm', 'learned'
  m.mlp, m.gelu, m.use_bias, m.tie_embeddings = 'gelu', 'exact', True, True
  m.norm_eps, m.type_vocab_size = 1e-12, 2


def check_keys(config, base=None, prefix: str = '') -> None:
  """Raises UserError for a key that configs/base.py does not declare."""
  base = base_config() if base is None else base
  for key in config.keys():
    name = f'{prefix}{key}'
    if key not in base:
      raise UserError(f'Unknown config key {name!r}: configs/base.py does not '
                      f'declare it. Known keys here: {", ".join(sorted(base.keys()))}.')
    if hasattr(config[key], 'keys') and hasattr(base[key], 'keys'):
      check_keys(config[key], base[key], prefix=f'{name}.')


# Machines the large presets know: name -> (description, mesh (data, fsdp,
# tensor), compute dtype, the TPU topology `--dry_run --topology` compiles
# for, or '' for GPUs and CPU). A preset picks one with the name after the
# colon: --config=configs/llama_8b.py:v5p-8.
HARDWARE = {
    'v5p-8': ('TPU v5p, 4 chips (one host)', (1, -1, 1), 'bfloat16', 'v5p:2x2x1'),
    'v5p-32': ('TPU v5p, 16 chips (4 hosts)', (1, -1, 1), 'bfloat16', 'v5p:2x2x4'),
    'v5e-8': ('TPU v5e, 8 chips (one host)', (1, -1, 1), 'bfloat16', 'v5e:2x4'),
    'v5e-16': ('TPU v5e, 16 chips (4 hosts)', (1, -1, 1), 'bfloat16', 'v5e:4x4'),
    'h100x8': ('8 x NVIDIA H100 80GB (one node)', (1, -1, 1), 'bfloat16', ''),
    'cpu': ('this machine, to try the shapes', (-1, 1, 1), 'float32', ''),
}


def apply_hardware(config, hardware: str, grad_accum_steps: dict[str, int]):
  """Sets mesh, compute dtype and micro-batching for a machine from ``HARDWARE``.

  ``grad_accum_steps`` maps each machine to the micro-batches per step that
  fit its memory (each preset finds them with ``--dry_run``).
  """
  if hardware not in HARDWARE:
    raise UserError(f'Unknown hardware {hardware!r} after the colon in --config: '
                    f'use one of {", ".join(HARDWARE)}.')
  _, (data, fsdp, tensor), dtype, _ = HARDWARE[hardware]
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
  config.model.dtype = dtype
  config.optim.grad_accum_steps = grad_accum_steps[hardware]
  return config
