"""The search space of a sweep: ``KEY=DISTRIBUTION`` lines in the config's own key names.

One dimension per ``--space`` flag, e.g.::

    optim.learning_rate=loguniform(1e-4,1e-2)
    model.num_layers=choice(2,4)
    train.batch_size=int(8,32,8)

Distributions (bounds inclusive):

  loguniform(LOW, HIGH)       floats, uniform in log space (LOW > 0)
  uniform(LOW, HIGH[, STEP])  floats, uniform (on a STEP grid if given)
  int(LOW, HIGH[, STEP])      integers LOW, LOW+STEP, ..., HIGH
  logint(LOW, HIGH)           integers, uniform in log space (LOW >= 1)
  choice(V1, V2, ...)         one of the listed values (numbers, strings, True/False)

Every key must be one that configs/base.py declares, and the values must suit
its type (an integer key takes ``int``, ``logint`` or integer choices). Grid
sampling needs a finite set: ``choice`` or ``int``.
"""

import ast
import dataclasses
import difflib
import itertools
import math
from typing import Any

from llm_jax.core.configuration import base_config
from llm_jax.core.errors import UserError

KINDS = ('loguniform', 'uniform', 'int', 'logint', 'choice')
_EXAMPLE = "--space='optim.learning_rate=loguniform(1e-4,1e-2)'"


@dataclasses.dataclass(frozen=True)
class Dimension:
  """One searched config key and the distribution its values come from."""
  key: str  # Dotted config key, e.g. 'optim.learning_rate'.
  kind: str  # One of KINDS.
  args: tuple  # (low, high[, step]) or the choices.
  spec: str  # The text it was parsed from, for records and messages.

  def suggest(self, trial) -> Any:
    """Asks an Optuna trial for this dimension's value."""
    if self.kind == 'choice':
      return trial.suggest_categorical(self.key, list(self.args))
    low, high, *step = self.args
    if self.kind in ('int', 'logint'):
      return trial.suggest_int(self.key, low, high, step=step[0] if step else 1,
                               log=self.kind == 'logint')
    return trial.suggest_float(self.key, low, high, step=step[0] if step else None,
                               log=self.kind == 'loguniform')

  def grid_values(self) -> list:
    """The finite values grid sampling visits; UserError if there are none."""
    if self.kind == 'choice':
      return list(self.args)
    if self.kind == 'int':
      low, high, *step = self.args
      return list(range(low, high + 1, step[0] if step else 1))
    raise UserError(
        f'--sampler=grid needs a finite set for {self.key} ({self.spec!r}): write '
        f'{self.key}=choice(...) (or int(LOW,HIGH[,STEP])), e.g. '
        f'{self.key}=choice(1e-4,1e-3,1e-2).')


def _leaves(config, prefix: str = '') -> dict[str, Any]:
  """Dotted key -> value of every leaf of a ConfigDict."""
  out = {}
  for key in config.keys():
    value = config[key]
    if hasattr(value, 'keys'):
      out.update(_leaves(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _parse_call(spec: str, text: str) -> tuple[str, tuple]:
  """``name(a, b, ...)`` -> (name, literal arguments); UserError otherwise."""
  usage = (f'write KEY=KIND(ARGS) with KIND one of {", ".join(KINDS)}, e.g. '
           f'{_EXAMPLE}')
  try:
    node = ast.parse(text.strip(), mode='eval').body
  except SyntaxError:
    node = None
  if (not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name)
      or node.keywords):
    raise UserError(f'--space={spec!r}: cannot read the distribution {text.strip()!r}; '
                    f'{usage}.')
  name = node.func.id
  if name not in KINDS:
    near = difflib.get_close_matches(name, KINDS, n=1)
    raise UserError(f'--space={spec!r}: unknown distribution {name!r}'
                    + (f' (did you mean {near[0]!r}?)' if near else '')
                    + f'; use one of {", ".join(KINDS)}.')
  try:
    args = tuple(ast.literal_eval(a) for a in node.args)
  except ValueError:
    raise UserError(f'--space={spec!r}: the arguments of {name}(...) must be plain '
                    'numbers, strings or True/False.') from None
  return name, args


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_args(spec: str, key: str, kind: str, args: tuple, default) -> tuple:
  """Checks the arguments against the kind and the key's type; returns them."""
  where = f'--space={spec!r}'
  if kind == 'choice':
    if not args:
      raise UserError(f'{where}: choice(...) needs at least one value.')
    if len(set(map(repr, args))) != len(args):
      raise UserError(f'{where}: choice(...) lists a value twice.')
    return tuple(_coerce_choice(where, key, v, default) for v in args)
  if len(args) not in (2, 3) or not all(_is_number(a) for a in args):
    raise UserError(f'{where}: {kind}(...) needs two numbers, LOW and HIGH'
                    + (', and an optional STEP' if kind in ('uniform', 'int') else '')
                    + f', e.g. {kind}({"1e-4,1e-2" if "uniform" in kind else "2,8"}).')
  if len(args) == 3 and kind not in ('uniform', 'int'):
    raise UserError(f'{where}: {kind}(...) takes no STEP; use uniform or int for a grid.')
  if isinstance(default, bool) or not _is_number(default):
    raise UserError(f'{where}: {key} is {type(default).__name__} '
                    f'({default!r} in configs/base.py); search it with choice(...).')
  low, high = args[:2]
  if not low < high:
    raise UserError(f'{where}: LOW must be below HIGH (got {low} and {high}).')
  if kind in ('int', 'logint'):
    if not all(isinstance(a, int) for a in args):
      raise UserError(f'{where}: {kind}(...) takes integers.')
  elif isinstance(default, int):
    raise UserError(f'{where}: {key} is an integer key ({default} in configs/base.py); '
                    f'use int(...), logint(...) or choice(...) of integers.')
  if kind in ('loguniform', 'logint') and low <= 0:
    raise UserError(f'{where}: {kind} needs LOW > 0 (got {low}).')
  if len(args) == 3 and not args[2] > 0:
    raise UserError(f'{where}: STEP must be positive (got {args[2]}).')
  if kind in ('uniform', 'loguniform'):
    return tuple(float(a) for a in args)
  return args


def _coerce_choice(where: str, key: str, value, default):
  """A choice value in the key's type (an int is fine for a float key)."""
  if isinstance(default, bool) or isinstance(value, bool):
    ok = isinstance(default, bool) and isinstance(value, bool)
  elif isinstance(default, float):
    ok, value = _is_number(value), float(value) if _is_number(value) else value
  elif isinstance(default, int):
    ok = isinstance(value, int)
  elif isinstance(default, str):
    ok = isinstance(value, str)
  else:
    ok = False
  if not ok:
    raise UserError(f'{where}: {value!r} does not fit {key}, a '
                    f'{type(default).__name__} key ({default!r} in configs/base.py).')
  if isinstance(value, float) and not math.isfinite(value):
    raise UserError(f'{where}: {value!r} is not a finite number.')
  return value


def parse(spec: str, leaves: dict[str, Any] | None = None) -> Dimension:
  """Parses and checks one ``KEY=DISTRIBUTION`` against configs/base.py."""
  leaves = _leaves(base_config()) if leaves is None else leaves
  key, sep, dist = spec.partition('=')
  key = key.strip()
  if not sep or not key or not dist.strip():
    raise UserError(f'--space={spec!r}: write KEY=DISTRIBUTION, e.g. {_EXAMPLE}.')
  if key not in leaves:
    sections = {k.rsplit('.', 1)[0] for k in leaves if '.' in k}
    if key in sections:
      raise UserError(f'--space={spec!r}: {key!r} is a section of the config, not a '
                      f'key; name one of its keys, e.g. {key}.'
                      f'{next(k for k in leaves if k.startswith(key + "."))[len(key) + 1:]}.')
    near = difflib.get_close_matches(key, list(leaves), n=1)
    raise UserError(f'--space={spec!r}: configs/base.py declares no key {key!r}'
                    + (f' (did you mean {near[0]!r}?)' if near else '')
                    + '. Search keys by their dotted names there, e.g. optim.learning_rate.')
  kind, args = _parse_call(spec, dist)
  args = _check_args(spec, key, kind, args, leaves[key])
  return Dimension(key=key, kind=kind, args=args, spec=f'{key}={dist.strip()}')


def parse_all(specs: list[str]) -> list[Dimension]:
  """Parses every ``--space`` value; UserError on a bad one or a key given twice."""
  if not specs:
    raise UserError(f'No search space: pass one --space=KEY=DISTRIBUTION per '
                    f'searched key, e.g. {_EXAMPLE}.')
  leaves = _leaves(base_config())
  dims = [parse(s, leaves) for s in specs]
  keys = [d.key for d in dims]
  twice = sorted({k for k in keys if keys.count(k) > 1})
  if twice:
    raise UserError(f'--space names {", ".join(twice)} more than once; give each key '
                    'one distribution.')
  return dims


def grid(dims: list[Dimension]) -> list[dict[str, Any]]:
  """Every point of the grid, in order (the last key varies fastest)."""
  values = [d.grid_values() for d in dims]
  return [dict(zip([d.key for d in dims], point)) for point in itertools.product(*values)]


def apply(config, params: dict[str, Any]):
  """A copy of ``config`` with each dotted key set to its value."""
  config = config.copy_and_resolve_references()
  for key, value in params.items():
    *sections, name = key.split('.')
    node = config
    for s in sections:
      node = node[s]
    node[name] = value
  return config


def override_flags(params: dict[str, Any]) -> list[str]:
  """``--config.KEY=VALUE`` flags that set these values (floats exactly)."""
  return [f'--config.{k}={v!r}' if isinstance(v, float) else f'--config.{k}={v}'
          for k, v in params.items()]


def short(params: dict[str, Any]) -> str:
  """``key=value`` pairs, short enough for a progress line."""
  return ' '.join(f'{k.rsplit(".", 1)[-1]}={_fmt(v)}' for k, v in params.items())


def _fmt(v) -> str:
  return f'{v:.3g}' if isinstance(v, float) else str(v)
