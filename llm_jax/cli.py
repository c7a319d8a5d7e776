"""What every command-line tool shares: one-line errors and absl flag parsing.

Bad input ends a CLI with ``error: <what and how to fix it>`` on stderr and
exit status 2; asking for ``--help`` is not an error and exits 0.
"""

import sys

from absl import flags

_HELP = ('--help', '--helpshort', '--helpfull', '-h', '-?')


def fail(message: str) -> None:
  """Prints ``error: message`` and exits with status 2."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def parse_flags(argv: list[str], on_error=None) -> list[str]:
  """absl's flag parsing with help exiting 0 and a bad flag one line, exit 2.

  Args:
    argv: the command line, program name first.
    on_error: ``exception -> message`` for errors other than a bad absl flag
      (e.g. a config override naming an unknown key); None re-raises them.
  """
  try:
    return flags.FLAGS(argv)
  except SystemExit:
    # absl prints the help, then exits 1; asking for help is not a failure.
    if any(a.split('=')[0] in _HELP for a in argv[1:]):
      sys.exit(0)
    raise
  except flags.Error as e:
    fail(f'{e}. See --help.')
  except Exception as e:  # pylint: disable=broad-except
    if on_error is None:
      raise
    fail(on_error(e))
  return []
