"""Reading a run directory back: its config, tokenizer and trained parameters.

A workdir (DESIGN.md) holds ``config.json`` (the resolved config),
``tokenizer.model`` (a copy of the run's SentencePiece model, so the directory
is complete on its own), ``checkpoints/<step>/`` (Orbax) and ``tb/``.
``generate``, ``evaluate``, ``export`` and ``init_from`` all start here.
"""

import dataclasses
import json
import os
from typing import Any

from etils import epath
import ml_collections

from llm_jax.errors import UserError

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.model'
CHECKPOINTS_DIR = 'checkpoints'


@dataclasses.dataclass
class Run:
  """A trained model read back from a workdir."""
  workdir: str
  config: ml_collections.ConfigDict
  model_cfg: Any  # llm_jax.model.ModelConfig
  graphdef: Any  # the model's nnx graph definition
  params: Any  # pure dict of float32 arrays, as in TrainState.params
  tokenizer: Any  # llm_jax.data.tokenizer.Tokenizer, or None if the run has none
  step: int
  meta: dict  # the checkpoint's metadata (see trainer.checkpoint_meta)

  def model(self):
    """The NNX Transformer with these parameters."""
    from flax import nnx  # pylint: disable=g-import-not-at-top
    return nnx.merge(self.graphdef, self.params)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run wrote to ``workdir/config.json``."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise UserError(f'{workdir} is not a run directory: it has no {CONFIG_FILE}. '
                    'Pass the --workdir of a training run.')
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (json.JSONDecodeError, ValueError) as e:
    raise UserError(f'{path} is not valid JSON ({e}); restore it from the run '
                    'or retrain.') from None


def save_tokenizer(workdir: str, model_bytes: bytes) -> str:
  """Copies the tokenizer model into the workdir (whole or not at all)."""
  path = epath.Path(workdir) / TOKENIZER_FILE
  if path.exists() and path.read_bytes() == model_bytes:
    return str(path)
  tmp = path.with_name(TOKENIZER_FILE + '.tmp')
  tmp.write_bytes(model_bytes)
  tmp.replace(path)
  return str(path)


def load_tokenizer(workdir: str):
  """The run's tokenizer, or None if the workdir has none (e.g. a GPT-2 import)."""
  from llm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir) / TOKENIZER_FILE
  return tokenizer_lib.Tokenizer.load(str(path)) if path.exists() else None


def latest_step(workdir: str) -> int:
  """The newest committed checkpoint step; UserError if there is none."""
  from llm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  directory = epath.Path(workdir) / CHECKPOINTS_DIR
  steps = []
  if directory.exists():
    steps = sorted((int(p.name) for p in directory.iterdir()
                    if p.name.isdigit() and ckpt_lib.committed(str(p))), reverse=True)
  if not steps:
    raise UserError(f'{workdir} has no complete checkpoint in {directory}. Train '
                    'first (python -m llm_jax.train --workdir=...), or pass the '
                    'workdir of a run that saved one.')
  return steps[0]


def load(workdir: str, step: int | None = None) -> Run:
  """Reads a run's config, tokenizer and parameters (newest checkpoint by default).

  Parameters come back on one device, float32, whatever mesh trained them,
  and layer by layer (``blocks/0``, ``blocks/1``, ...) even when the run
  scanned over stacked layers (``model.scan_layers``): ``model_cfg`` then has
  ``scan_layers=False``.

  Raises:
    UserError: not a run directory, no complete checkpoint, or the checkpoint
      does not fit the config.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from llm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from llm_jax import sharding, trainer  # pylint: disable=g-import-not-at-top

  workdir = workdir if '://' in workdir else os.path.abspath(workdir)
  config = read_config(workdir)
  step = latest_step(workdir) if step is None else step
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, CHECKPOINTS_DIR),
                               every=0, keep=1_000_000)
  try:
    if not ckpt.is_committed(step):
      raise UserError(f'No complete checkpoint at step {step} in {ckpt.directory}; '
                      f'steps there: {ckpt.all_steps()}.')
    meta = ckpt.metadata(step)
    # One device, whatever mesh trained it: Orbax reshards on restore.
    one = ml_collections.ConfigDict(config.to_dict())
    one.mesh.data, one.mesh.fsdp, one.mesh.tensor = 1, 1, 1
    one.optim.grad_accum_steps = 1
    one.train.batch_size = 1
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                             sharding.MESH_AXES)
    tr = trainer.Trainer.build(one, meta['vocab_size'], mesh)
    try:
      state = ckpt.restore(step, tr.abstract_state())
    except Exception as e:  # pylint: disable=broad-except
      first = (str(e).strip().splitlines() or [''])[0][:200]
      raise UserError(f'The checkpoint at step {step} in {ckpt.directory} does not '
                      f'load into the model its config.json describes ({first}).') from None
  finally:
    ckpt.close()
  # Layer by layer from here on (decode, export and conversion walk blocks/0,
  # blocks/1, ...), even if the run scanned over stacked layers.
  model_cfg, graphdef, params = tr.unrolled(state.params)
  return Run(workdir=workdir, config=config, model_cfg=model_cfg,
             graphdef=graphdef, params=params,
             tokenizer=load_tokenizer(workdir), step=step, meta=meta)
