"""A study's report: a Markdown table of its trials, the best config, and plots.

``write`` puts ``report.md`` and its PNGs (optimisation history, learning
curves, slice, parameter importance, drawn by ``optuna.visualization.matplotlib``)
in the study directory; ``python -m llm_jax.sweep --study=DIR --report`` and
the end of every sweep call it.
"""

import io
import os
import shlex
import warnings

import numpy as np
import optuna

from llm_jax.core import files
from llm_jax.sweeps import space as space_lib
from llm_jax.sweeps import study as study_lib

REPORT_FILE = 'report.md'
State = optuna.trial.TrialState


def make(study_dir: str, *, storage: str = '', study_name: str = '') -> dict:
  """Writes the report of an existing study; see ``write``."""
  study, settings = study_lib.open_study(study_dir, {}, storage=storage,
                                         study_name=study_name, create=False)
  return write(study_dir, study, settings)


def write(study_dir: str, study: optuna.Study, settings: study_lib.Settings, *,
          plots: bool = True) -> dict:
  """Writes report.md (and the plots); returns {'path', 'text', 'best', 'plots'}."""
  study_dir = os.path.abspath(study_dir)
  trials = study.get_trials(deepcopy=False)
  best = _best(trials)
  plots = _plots(study, study_dir) if plots and best is not None else {}
  text = '\n'.join([_header(study, settings, study_dir, trials),
                    _table(trials, settings), _best_section(best, settings, study_dir),
                    *(f'![{name}]({os.path.basename(path)})\n' for name, path in plots.items())])
  path = files.atomic_write(os.path.join(study_dir, REPORT_FILE), text)
  best_info = None if best is None else {
      'number': best.number, 'value': best.value, 'params': best.params,
      'workdir': study_lib.trial_dir(study_dir, study_lib.origin(best)),
      'command': _command(best, settings)}
  return {'path': path, 'text': text, 'best': best_info, 'plots': plots}


def _best(trials):
  done = [t for t in trials if t.state == State.COMPLETE]
  return min(done, key=lambda t: (t.value, t.number)) if done else None


def _header(study, settings, study_dir: str, trials) -> str:
  counts = {s: sum(t.state == s for t in trials) for s in State}
  finished = sum(study_lib.finished(t) for t in trials)
  prune = ('none' if settings.prune == 'none' else
           f'{settings.prune} (after {settings.prune_startup} trials and '
           f'{settings.prune_warmup} steps)')
  return (f'# Sweep {study.study_name}\n\n'
          f'- study: `{study_dir}`\n'
          f'- base config: `{shlex.join(settings.config_args)}`\n'
          f'- space: {", ".join(f"`{s}`" for s in settings.space)}\n'
          f'- sampler {settings.sampler} (seed {settings.seed}), pruner {prune}; '
          f'objective: {settings.objective} at the end of training, minimised\n'
          f'- {finished} of {settings.trials} trials finished: '
          f'{counts[State.COMPLETE]} complete, {counts[State.PRUNED]} pruned, '
          f'{counts[State.FAIL]} failed, {counts[State.RUNNING]} running, '
          f'{counts[State.WAITING]} queued\n')


def _state(t, trials) -> str:
  """The state column: why a trial failed, and which trial resumed it."""
  if t.state != State.FAIL:
    return t.state.name
  if 'error' in t.user_attrs:
    return f'FAIL: {t.user_attrs["error"][:80]}'
  if t.user_attrs.get('surplus'):
    return 'FAIL: surplus (asked with another worker; never ran)'
  retry = next((r for r in trials if r.user_attrs.get('retry_after') == t.number), None)
  if retry is not None:
    return f'FAIL: {retry.user_attrs["why"]}; resumed as trial {retry.number}'
  return 'FAIL'


def _objective(t) -> str:
  if t.state == State.COMPLETE:
    return f'{t.value:.4f}'
  if t.intermediate_values:
    step = max(t.intermediate_values)
    return f'({t.intermediate_values[step]:.4f} at step {step})'
  return '—'


def _table(trials, settings) -> str:
  keys = [d.key for d in settings.dims()]
  head = ['trial', *keys, settings.objective, 'state', 'steps', 'wall time']
  rows = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for t in trials:
    wall = t.user_attrs.get('wall_seconds')
    cells = [str(t.number), *(_fmt(t.params.get(k, '—')) for k in keys), _objective(t),
             _state(t, trials), str(t.user_attrs.get('steps', '—')),
             f'{wall:.0f} s' if wall is not None else '—']
    rows.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(rows) + '\n'


def _fmt(v) -> str:
  return f'{v:.4g}' if isinstance(v, float) else str(v)


def _command(best, settings) -> str:
  """The training command of the best trial's config, ready to run."""
  return shlex.join(['python', '-m', 'llm_jax.train', *settings.config_args,
                     *space_lib.override_flags(best.params)])


def _best_section(best, settings, study_dir: str) -> str:
  if best is None:
    return '## Best\n\nNo trial has completed yet.\n'
  workdir = study_lib.trial_dir(study_dir, study_lib.origin(best))
  return (f'## Best: trial {best.number}, {settings.objective} {best.value:.4f}\n\n'
          f'Train this config again:\n\n    {_command(best, settings)}\n\n'
          f'Its run directory (generate, evaluate and export work on it): `{workdir}`\n')


def _plots(study: optuna.Study, study_dir: str) -> dict[str, str]:
  """PNGs of the study; a plot Optuna cannot draw yet (too few trials) is left out."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # Optuna's experimental plots, tight_layout.
    return _draw_all(study, study_dir)


def _draw_all(study: optuna.Study, study_dir: str) -> dict[str, str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from optuna.visualization import matplotlib as vis  # pylint: disable=g-import-not-at-top
  out = {}
  curves = any(t.intermediate_values for t in study.get_trials(deepcopy=False))
  for name, draw in (('history', vis.plot_optimization_history),
                     ('learning curves', vis.plot_intermediate_values if curves else None),
                     ('slice', vis.plot_slice),
                     ('importance', vis.plot_param_importances)):
    if draw is None:  # No evaluations during training: no curves to draw.
      continue
    try:
      axes = draw(study)
    except (ValueError, RuntimeError, ZeroDivisionError):
      continue
    fig = np.ravel(axes)[0].figure
    if name == 'slice':  # One panel per searched key, and the colour bar.
      fig.set_size_inches(1.5 + 3.5 * len(np.ravel(axes)), 4.2)
    png = io.BytesIO()
    fig.savefig(png, dpi=90, format='png', bbox_inches='tight')
    plt.close(fig)
    path = os.path.join(study_dir, f'{name.replace(" ", "_")}.png')
    out[name] = files.atomic_write(path, png.getvalue())
  return out
