"""A run directory: reading it back (config, tokenizer, parameters) and writing a new one.

A workdir (docs/runs-and-reliability.md) holds ``config.json`` (the resolved config),
a copy of the run's tokenizer, so the directory is complete on its own
(``tokenizer.model`` for SentencePiece, or ``tokenizer.json`` with its
``tokenizer_config.json`` for a Hugging Face tokenizer: one or the other),
``checkpoints/<step>/`` (Orbax), ``tb/`` and ``train.lock`` (who trains it
now: ``training_lock``).
``generate``, ``evaluate``, ``export`` and ``init_from`` all start here;
imports and vocabulary extension write new ones with ``write``.
"""

import contextlib
import dataclasses
import json
import os
import socket
import time
import types
from collections.abc import Iterator
from typing import Any

from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from llm_jax.core import files
from llm_jax.core.errors import UserError
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.training import checkpoint as ckpt_lib
from llm_jax.training import sharding, steps, trainer

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = tokenizer_lib.SENTENCEPIECE_FILE
# A run's tokenizer is in one of these (SentencePiece, Hugging Face).
TOKENIZER_FILES = tokenizer_lib.FILE_NAMES
CHECKPOINTS_DIR = 'checkpoints'
# Held (flock) by the training process that owns the run; says who that is.
LOCK_FILE = 'train.lock'


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
  # A DPO/GRPO run's frozen reference (TrainState.ref_params), else None.
  ref_params: Any = None

  def model(self):
    """The NNX Transformer with these parameters."""
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


def unwritable(workdir: str, error: OSError) -> UserError:
  """The one line for a run directory this user cannot write."""
  reason = error.strerror or str(error)
  return UserError(f'Cannot write to the run directory {workdir}: {reason} '
                   f'({error.filename or workdir}). Training writes config.json, '
                   'checkpoints and TensorBoard events there: make it writable for '
                   'this user, or pass another --workdir.')


@contextlib.contextmanager
def training_lock(workdir: str) -> Iterator[None]:
  """Holds ``workdir`` for this training process; refuses if another holds it.

  The lock is an ``flock`` on ``<workdir>/train.lock``, held open for the
  run's life: the kernel drops it when the process ends, however it ends, so
  a run killed with ``kill -9`` never blocks the next start. Only process 0
  of a multi-host run takes it (the others write no run files of their own);
  object stores (``gs://``) have no locks and are not locked.

  Raises:
    UserError: another process holds the lock (its pid, host and start time
      are named), or the directory cannot be written.
  """
  if '://' in workdir or jax.process_index() != 0:
    yield
    return
  lock = files.FileLock(os.path.join(workdir, LOCK_FILE))
  me = dict(pid=os.getpid(), host=socket.gethostname(),
            started=time.strftime('%Y-%m-%d %H:%M:%S %Z'))
  try:
    taken = lock.acquire(wait=False, note=json.dumps(me))
  except OSError as e:
    raise unwritable(workdir, e) from None
  if not taken:
    try:
      other = json.loads(lock.holder())
    except ValueError:
      other = {}
    pid, host = other.get('pid', '?'), other.get('host', '?')
    raise UserError(
        f'{workdir} is in use by another training process: pid {pid} on {host}, '
        f'started {other.get("started", "?")}. Two trainers on one run directory '
        f'would interleave their checkpoints. Wait for it to finish, stop it (kill '
        f'{pid} saves a checkpoint and exits), or pass another --workdir.')
  try:
    yield
  finally:
    lock.release()


def save_tokenizer(workdir: str, tokenizer) -> str:
  """Copies the tokenizer's files into the workdir (each whole or not at all).

  Raises:
    UserError: the workdir already holds a tokenizer of the other kind.
  """
  tok_files = tokenizer.files()
  for name in TOKENIZER_FILES:
    if name not in tok_files and (epath.Path(workdir) / name).exists():
      raise UserError(f'{workdir} holds {name}, but this run\'s tokenizer is '
                      f'{tokenizer.file_name}: a run keeps one tokenizer. Use a new '
                      '--workdir (or the tokenizer the run started with).')
  for name, data in tok_files.items():
    path = epath.Path(workdir) / name
    if not (path.exists() and path.read_bytes() == data):
      files.atomic_write(str(path), data)
  return str(epath.Path(workdir) / tokenizer.file_name)


def tokenizer_path(workdir: str) -> str | None:
  """The run's tokenizer file (tokenizer.model or tokenizer.json), or None."""
  found = [str(epath.Path(workdir) / n) for n in TOKENIZER_FILES
           if (epath.Path(workdir) / n).exists()]
  if len(found) > 1:
    raise UserError(f'{workdir} holds both {" and ".join(TOKENIZER_FILES)}; a run '
                    'keeps one tokenizer: remove the one it was not trained with.')
  return found[0] if found else None


def load_tokenizer(workdir: str):
  """The run's tokenizer, or None if the workdir has none."""
  path = tokenizer_path(workdir)
  if path is None:
    return None
  return tokenizer_lib.load(
      path, fix="it is this run's copy of its tokenizer: copy the file the run was "
      'trained with there again')


def latest_step(workdir: str) -> int:
  """The newest committed checkpoint step; UserError if there is none."""
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
  workdir = workdir if '://' in workdir else os.path.abspath(workdir)
  config, tr, state, step, meta = _restore(workdir, step)
  # Layer by layer from here on (decode, export and conversion walk blocks/0,
  # blocks/1, ...), even if the run scanned over stacked layers.
  model_cfg, graphdef, params = tr.unrolled(state.params)
  ref_params = None if state.ref_params is None else tr.unrolled(state.ref_params)[2]
  return Run(workdir=workdir, config=config, model_cfg=model_cfg,
             graphdef=graphdef, params=params,
             tokenizer=load_tokenizer(workdir), step=step, meta=meta,
             ref_params=ref_params)


def load_state(workdir: str, step: int | None = None) -> steps.TrainState:
  """The whole train state of a checkpoint, on one device, as it was trained.

  Parameters, optimizer state, step and RNG: what a resume continues from
  (the tests compare these bit for bit across interrupted runs).
  """
  workdir = workdir if '://' in workdir else os.path.abspath(workdir)
  return _restore(workdir, step)[2]


def _restore(workdir: str, step: int | None):
  """(config, one-device trainer, TrainState, step, meta) of a checkpoint."""
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
  return config, tr, state, step, meta


def require_tokenizer(run):
  """The run's tokenizer; UserError if its workdir has none."""
  if run.tokenizer is None:
    raise UserError(f'{run.workdir} has no tokenizer ({" or ".join(TOKENIZER_FILES)}); '
                    'copy the tokenizer the run was trained with there.')
  return run.tokenizer


def write(workdir: str, config, params: dict, *, vocab_size: int,
          tokenizer, source: dict, step: int = 0,
          protect: tuple[str, ...] = (),
          extra_files: dict[str, bytes] | None = None) -> str:
  """Writes a new run directory: config.json, the tokenizer, checkpoints/<step>.

  The directory appears whole or not at all (``files.atomic_dir``); an existing
  non-empty ``workdir`` is refused, and so is one that is, holds or lies
  inside a directory of ``protect`` (the run or HF directory it comes from).
  The checkpoint is a whole ``TrainState`` (fresh optimizer state,
  ``trainer.make_tx``'s) with the metadata ``trainer.checkpoint_meta`` writes;
  an import has no training data, so its data hash is None
  (``checkpoint.check_compatible`` then skips it). ``extra_files`` (name ->
  bytes) are written into the directory too (a pruned run's masks).
  """
  workdir = os.path.abspath(workdir)
  with files.atomic_dir(workdir, protect=protect, what='run directory') as tmp:
    if tokenizer is not None:
      save_tokenizer(tmp, tokenizer)
      # Where the tokenizer will be once the directory is renamed into place.
      config.tokenizer.path = os.path.join(workdir, tokenizer.file_name)
    files.atomic_write_json(os.path.join(tmp, CONFIG_FILE), json.loads(config.to_json()))
    for name, data in (extra_files or {}).items():
      files.atomic_write(os.path.join(tmp, name), data)
    tx = trainer.make_tx(config)
    params = jax.device_put(params, jax.devices()[0])
    state = steps.TrainState(
        step=jnp.asarray(step, jnp.int32), params=params, opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(config.seed)))
    tok = types.SimpleNamespace(sha256=tokenizer.sha256 if tokenizer is not None else None)
    data = types.SimpleNamespace(tokenizer=tok, vocab_size=vocab_size,
                                 manifest={'content_sha256': None})
    meta = dict(trainer.checkpoint_meta(config, data, step), source=source)
    ckpt = ckpt_lib.Checkpointer(os.path.join(tmp, CHECKPOINTS_DIR), every=0, keep=1)
    try:
      ckpt.save(step, state, meta)
    finally:
      ckpt.close()
  return workdir
