"""Loss and learning-rate curves of runs, drawn from their TensorBoard events."""

import io
import os

from llm_jax.core import files
from llm_jax.core.errors import UserError


def read_scalars(workdir: str) -> dict[str, dict[int, float]]:
  """Every scalar in ``<workdir>/tb``: tag -> {step: value} (later files win)."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  logdir = os.path.join(workdir, 'tb')
  if not os.path.isdir(logdir) or not os.listdir(logdir):
    raise UserError(f'{workdir} has no TensorBoard events in {logdir}; pass the '
                    '--workdir of a training run.')
  acc = event_accumulator.EventAccumulator(
      logdir, size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0})
  acc.Reload()
  out = {}
  # tf.summary (TF2) writes scalars as tensor events; older writers as scalars.
  for tag in acc.Tags().get('tensors', []):
    out[tag] = {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
                for e in acc.Tensors(tag)}
  for tag in acc.Tags().get('scalars', []):
    out[tag] = {e.step: float(e.value) for e in acc.Scalars(tag)}
  return out


def plot(workdirs: list[str], out_path: str) -> str:
  """Loss (train and validation) and learning-rate curves of runs, as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(12, 4.5))
  for i, workdir in enumerate(workdirs):
    scalars = read_scalars(workdir)
    name, color = os.path.basename(os.path.normpath(workdir)), f'C{i}'
    for tag, ax, style, label in (('loss', ax_loss, '-', 'train'),
                                  ('val_loss', ax_loss, 'o--', 'val'),
                                  ('lr', ax_lr, '-', None)):
      if tag in scalars:
        steps = sorted(scalars[tag])
        ax.plot(steps, [scalars[tag][s] for s in steps], style, color=color,
                label=f'{name} {label}' if label else name, markersize=4)
  ax_loss.set(title='Loss', xlabel='step', ylabel='nats / token')
  ax_lr.set(title='Learning rate', xlabel='step', ylabel='learning rate')
  for ax in (ax_loss, ax_lr):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  out_path = os.path.abspath(out_path)
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  png = io.BytesIO()
  fig.savefig(png, dpi=100, format='png')
  plt.close(fig)
  return files.atomic_write(out_path, png.getvalue())
