"""Starting from existing weights: ``config.init_from`` and vocabulary extension.

* ``init_state``: a fresh run's ``TrainState`` whose parameters come from
  another run's (or an imported) checkpoint, with this run's own optimizer
  state, schedule and data. The parameter shapes must match; LoRA adapters
  (``llm_jax/lora.py``) keep their own fresh init.
* ``extend_vocab_workdir``: trains SentencePiece pieces on new text, appends
  those the tokenizer lacks (old ids unchanged), grows the embedding and
  output rows (new rows start at the mean of the old ones) and writes a new
  workdir with the merged tokenizer.
"""

import dataclasses
import logging
import os

import numpy as np

from llm_jax.errors import UserError

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
  """The path of the source run's tokenizer.model, or None if it has none."""
  from llm_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir, _ = resolve(init_from)
  workdir_lib.read_config(workdir)  # A clear error if it is not a run directory.
  path = os.path.join(workdir, workdir_lib.TOKENIZER_FILE)
  return path if os.path.exists(path) else None


def use_source_tokenizer(config) -> None:
  """With ``init_from`` and no ``tokenizer.path``, uses the source's tokenizer.

  The new run must encode text with the ids its starting weights learnt; a
  source without a SentencePiece tokenizer (a GPT-2 import) needs one given.
  """
  if not config.init_from or config.tokenizer.path:
    return
  path = source_tokenizer(config.init_from)
  if path is None:
    raise UserError(
        f'init_from={config.init_from} has no tokenizer.model (e.g. a GPT-2 '
        'import, whose tokenizer is not SentencePiece). Set '
        '--config.tokenizer.path to a SentencePiece model with the same ids.')
  config.tokenizer.path = path


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
    if '/lora_' in path:
      continue
    if path not in source_flat:
      raise UserError(f'init_from={where} has no parameter {path}{why}. Use the '
                      'same model config as the source run.')
    if tuple(source_flat[path].shape) != tuple(spec.shape):
      raise UserError(f'init_from={where}: parameter {path} has shape '
                      f'{list(source_flat[path].shape)} there but '
                      f'{list(spec.shape)} here{why}. Use the same model config '
                      'as the source run.')
  extra = sorted(set(source_flat) - set(target_flat))
  if extra:
    raise UserError(f'init_from={where} has parameter {extra[0]}, which this '
                    f'model lacks{why}. Use the same model config as the source run.')
  if diffs:
    logging.warning('init_from=%s: same shapes, but the model config differs: %s',
                    where, '; '.join(diffs))


def init_state(trainer, init_from: str):
  """A fresh TrainState whose (non-adapter) parameters come from ``init_from``."""
  import jax  # pylint: disable=g-import-not-at-top
  from llm_jax import convert, metrics  # pylint: disable=g-import-not-at-top
  from llm_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir, step = resolve(init_from)
  run = workdir_lib.load(workdir, step)
  params = run.params  # Unrolled blocks: workdir.load unstacks a scanned run.
  if any('/lora_' in k for k in convert.flatten_params(params)):
    from llm_jax import lora  # pylint: disable=g-import-not-at-top
    params = lora.merge(params, run.config.lora)
  if trainer.model_cfg.scan_layers:
    from llm_jax import model as model_lib  # pylint: disable=g-import-not-at-top
    params = model_lib.stack_blocks(params)
  source = convert.flatten_params(params)
  abstract = trainer.abstract_state().params
  target = convert.flatten_params(abstract)
  check_fits(source, target, run.model_cfg, trainer.model_cfg, init_from)
  state = trainer.init_fn()
  fresh = convert.flatten_params(state.params)
  def place(value, spec):
    # From a host copy, each device taking its own slice: no device needs
    # the whole array, and it works where the mesh spans several hosts.
    host = np.asarray(jax.device_get(value))
    return jax.make_array_from_callback(host.shape, spec.sharding, lambda i: host[i])

  merged = {path: (fresh[path] if '/lora_' in path else place(source[path], spec))
            for path, spec in target.items()}
  metrics.say(f'Initialised from {workdir} (step {run.step}); optimizer state, '
              'schedule and data are this run\'s own.')
  return state.replace(params=convert.unflatten_like(merged, abstract))


def config_from(init_from: str, base=None):
  """A config that continues ``init_from``: its model, this run's everything else.

  The model section (and, for a learned position table, ``data.seq_len``) is
  the source run's; ``init_from`` is set; data, optimizer and schedule are
  ``base``'s (configs/base.py by default), to override on the command line.
  """
  from llm_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from llm_jax.configuration import base_config  # pylint: disable=g-import-not-at-top
  config = base_config() if base is None else base
  if not init_from:
    return config  # `--help` and the key checks load presets without one.
  workdir, _ = resolve(init_from)
  source = workdir_lib.read_config(workdir)
  for key in config.model.keys():
    if key in source.model:
      config.model[key] = source.model[key]
  if source.model.position == 'learned' or source.data.seq_len < config.data.seq_len:
    config.data.seq_len = source.data.seq_len
  config.init_from = init_from
  config.name = f'{os.path.basename(workdir)}-continued'
  return config


def grow_vocab(params: dict, new_vocab_size: int) -> dict:
  """Appends embedding rows (and LM-head columns) at the mean of the old ones.

  Old rows and columns are untouched, so on old ids the model computes what
  it did; a new row starts where an average token is, not at random noise
  that would dominate the softmax.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  params = dict(params)
  table = params['embed']['table']
  extra = new_vocab_size - table.shape[0]
  if extra < 0:
    raise UserError(f'Cannot shrink the vocabulary from {table.shape[0]} to '
                    f'{new_vocab_size}.')
  mean_row = jnp.mean(table, axis=0, keepdims=True)
  params['embed'] = dict(params['embed'], table=jnp.concatenate(
      [table, jnp.repeat(mean_row, extra, axis=0)], axis=0))
  if params.get('lm_head') is not None:
    kernel = params['lm_head']['kernel']
    mean_col = jnp.mean(kernel, axis=1, keepdims=True)
    params['lm_head'] = dict(params['lm_head'], kernel=jnp.concatenate(
        [kernel, jnp.repeat(mean_col, extra, axis=1)], axis=1))
  return params


def read_texts(pattern: str) -> list[str]:
  """The documents of comma-separated globs (text files, or JSONL 'text')."""
  import glob  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  files = sorted({f for p in pattern.split(',') if p
                  for f in glob.glob(os.path.expanduser(p), recursive=True)})
  if not files:
    raise UserError(f'--text={pattern!r} matches no file.')
  texts = []
  for path in files:
    with open(path, encoding='utf-8', errors='replace') as f:
      if path.endswith('.jsonl'):
        texts.extend(json.loads(line)['text'] for line in f if line.strip())
      else:
        texts.append(f.read())
  return texts


def extend_vocab_workdir(workdir: str, text: str, num_pieces: int | None,
                         out: str) -> str:
  """Writes ``out``: ``workdir``'s model with new pieces learnt from ``text``.

  Args:
    workdir: a run (or import) with a SentencePiece tokenizer.model.
    text: comma-separated globs of the new text.
    num_pieces: the most pieces to add.
    out: the new workdir (checkpoint at the source's step, fresh optimizer
      state, the merged tokenizer.model); continue it with init_from.

  Returns:
    The new workdir's absolute path.
  """
  from llm_jax import convert, metrics  # pylint: disable=g-import-not-at-top
  from llm_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from llm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  run = workdir_lib.load(workdir)
  if run.tokenizer is None:
    raise UserError(f'{workdir} has no tokenizer.model to extend (a GPT-2 import '
                    'has none: its tokenizer is not SentencePiece).')
  merged, added = tokenizer_lib.extend_tokenizer(
      run.tokenizer.model_bytes, read_texts(text), num_pieces or 0,
      num_threads=run.config.data.num_threads)
  vocab_size = run.tokenizer.vocab_size + len(added)
  params = run.params
  if any('/lora_' in k for k in convert.flatten_params(params)):
    from llm_jax import lora  # pylint: disable=g-import-not-at-top
    params = lora.merge(params, run.config.lora)
  params = grow_vocab(params, vocab_size)
  config = ml_collections.ConfigDict(run.config.to_dict())
  config.tokenizer.vocab_size = vocab_size
  config.init_from = ''
  config.lora.rank = 0  # Adapters, if any, are merged into the weights.
  metrics.say(f'Added {len(added)} pieces ({run.tokenizer.vocab_size} -> '
              f'{vocab_size}), e.g. {" ".join(added[:10])}')
  return convert.write_workdir(
      out, config, params, vocab_size=vocab_size, tokenizer_bytes=merged,
      source=dict(extended_from=run.workdir, step=run.step, added_pieces=len(added)))
