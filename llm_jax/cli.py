"""What every command shares: absl flags, one-line errors, exit statuses.

Each command (``python -m llm_jax.X``) defines its flags on a ``FlagValues`` of
its own (``cli.flag_values()``), so several commands can be imported and
called in one process (tests, notebooks) without their flag names clashing,
and hands ``cli.run`` a ``main`` that makes one library call. ``cli.run``:

* ``--help`` (or ``-h``) prints the command's docstring and flags, exit 0;
* a bad flag, a missing required flag or a stray argument is one line,
  ``error: <what and how to fix it>`` on stderr, exit 2;
* a ``UserError`` raised by the library is the same one line, exit 2.
"""

import logging
import os
import re
import sys
from typing import Any
from collections.abc import Callable

from absl import flags
from ml_collections import config_flags

from llm_jax.core.errors import CheckpointWriteError
from llm_jax.core.errors import UserError

_HELP = ('--help', '--helpshort', '--helpfull', '-h', '-?')


def fail(message: str) -> None:
  """Prints ``error: message`` and exits with status 2."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def flag_values() -> flags.FlagValues:
  """A fresh flag registry for one command."""
  return flags.FlagValues()


def parse(fv: flags.FlagValues, argv: list[str], *, doc: str, prog: str,
          on_error: Callable[[Exception], str] | None = None) -> list[str]:
  """Parses ``argv`` (no program name) into ``fv``; returns positional arguments.

  Args:
    fv: the command's flags.
    argv: the arguments after the program name.
    doc: the command's docstring, printed by ``--help``.
    prog: e.g. ``python -m llm_jax.evaluate``, for messages.
    on_error: ``exception -> message`` for errors other than a bad absl flag
      (e.g. a config override naming an unknown key); None re-raises them.
  """
  if any(a.split('=')[0] in _HELP for a in argv):
    print(doc.strip() + '\n\nFlags:\n' + fv.get_help(include_special_flags=False))
    sys.exit(0)
  fv.unparse_flags()  # A second call in one process starts from the defaults.
  try:
    return fv([prog, *argv])[1:]
  except flags.Error as e:
    fail(f'{e}. See {prog} --help.')
  except Exception as e:  # pylint: disable=broad-except
    if on_error is None:
      raise
    fail(on_error(e))
  return []


def run(main: Callable[..., Any], fv: flags.FlagValues, argv: list[str] | None, *,
        doc: str, prog: str, positional: int = 0,
        on_error: Callable[[Exception], str] | None = None) -> Any:
  """Parses flags, calls ``main(*positional_args)``; UserError is one line, exit 2.

  Returns what ``main`` returns (so tests and notebooks can call a command).
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  rest = parse(fv, argv, doc=doc, prog=prog, on_error=on_error)
  if len(rest) > positional or (positional and len(rest) < positional):
    extra = ' '.join(rest[positional:]) if len(rest) > positional else '(nothing)'
    fail(f'Unexpected arguments: {extra}. Flags look like --name=value; see '
         f'{prog} --help.')
  quiet_libraries()
  try:
    return main(*rest)
  except UserError as e:
    if isinstance(e, CheckpointWriteError) and _is_command():
      # Orbax threads of the failed save may wait 300 s for a signal that will
      # not come; the command exits now (its files are closed, the log flushed).
      print(f'error: {e}', file=sys.stderr, flush=True)
      logging.shutdown()
      sys.stdout.flush()
      os._exit(2)
    fail(str(e))


def _is_command() -> bool:
  """Whether this process is ``python -m llm_jax.X`` (not a test or a notebook)."""
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  return bool(spec and (spec.name or '').startswith('llm_jax.'))


def quiet_libraries() -> None:
  """Library INFO logs (absl, Orbax, TF) would drown the commands' own lines."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('absl').setLevel(logging.WARNING)


# ---- The --config flag of commands that take a config file (train, bench).


def define_config(fv: flags.FlagValues):
  """``--config=FILE`` and its ``--config.a.b=VALUE`` overrides."""
  return config_flags.DEFINE_config_file(
      'config', None, 'Config file, e.g. configs/base.py; override any key with '
      '--config.a.b=VALUE.', lock_config=True, flag_values=fv)


def config_error(argv: list[str]) -> Callable[[Exception], str]:
  """The one line for a config file that fails to load, or an unknown override key."""
  path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')),
              next((b for a, b in zip(argv, argv[1:]) if a == '--config'), '?'))

  def message(e: Exception) -> str:
    if _raised_in(e, path) or isinstance(e, (OSError, SyntaxError)):
      return config_file_message(e, path)  # The file itself is broken or missing.
    if not isinstance(e, (KeyError, AttributeError)):
      raise e
    # ml_collections: an override naming a key the config does not have.
    detail = str(e.args[0] if e.args else e)
    key = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", detail)[0] if detail else '?'
    hint = re.search(r'Did you mean "([^"]+)"', detail)
    flag = next((a.split('=')[0] for a in argv if a.startswith('--config.') and
                 re.search(rf'\b{key}\b', a.split('=')[0])), '--config.*')
    return (f'Unknown config key in {flag}: the config has no key {key!r}'
            + (f' (did you mean {hint.group(1)!r}?)' if hint else '')
            + '. configs/base.py declares every key.')

  return message


def _raised_in(e: BaseException, path: str) -> bool:
  """Whether the exception's traceback passes through the config file."""
  real = os.path.realpath(path.split(':')[0])
  tb = e.__traceback__
  while tb is not None:
    if os.path.realpath(tb.tb_frame.f_code.co_filename) == real:
      return True
    tb = tb.tb_next
  return False


def config_file_message(e: BaseException, path: str) -> str:
  """``Cannot load the config file ...``: naming the file and, if known, the line."""
  if isinstance(e, SyntaxError):
    where = f'{e.filename or path}, line {e.lineno}'
    return (f'Cannot load the config file {path!r}: {e.msg} ({where}). Fix that line, '
            'or pass another file, e.g. --config=configs/base.py.')
  line = None
  tb = e.__traceback__
  real = os.path.realpath(path.split(':')[0])
  while tb is not None:  # The innermost line of the config file itself.
    if os.path.realpath(tb.tb_frame.f_code.co_filename) == real:
      line = tb.tb_lineno
    tb = tb.tb_next
  inner = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], KeyError) else e
  text = str(inner.args[0] if isinstance(inner, KeyError) and inner.args else inner)
  lines = [l.strip() for l in text.strip().splitlines()] or [type(e).__name__]
  # ml_collections wraps a missing file's errno in lines of its own: keep that.
  last = lines[-1] if isinstance(e, OSError) else ' '.join(lines)
  if line is not None:
    return (f'Cannot load the config file {path!r}: {type(e).__name__}: {last} '
            f'({path}, line {line}). Fix that line, or pass another file, e.g. '
            '--config=configs/base.py.')
  return (f'Cannot load the config file {path!r}: {last}. Pass an existing file '
          'that defines get_config(), e.g. --config=configs/base.py.')


def load_config(config_flag, fv: flags.FlagValues):
  """The --config value, or one clear line if the file cannot be loaded."""
  try:
    config = config_flag.value
    if config is not None:
      config.keys()  # A file that failed to load raises on first use.
  except Exception as e:  # pylint: disable=broad-except
    path = fv['config'].config_filename if 'config' in fv else '?'
    if not (isinstance(e, (OSError, SyntaxError, AttributeError)) or _raised_in(e, path)):
      raise
    fail(config_file_message(e, path))
  if config is None:
    fail('No config given. Pass --config=configs/base.py (or another file in configs/).')
  return config
