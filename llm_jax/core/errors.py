"""The error type for problems in what the user gave us (config, data, checkpoint).

A ``UserError`` message is complete on its own: it says what is wrong, where
(file, config key, step) and what to do. The CLIs print it as one line and exit
with status 2, without a traceback; anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
  """A problem with the user's input, explained in plain words."""


class CheckpointWriteError(UserError):
  """A checkpoint could not be written (lost volume, read-only, full disk).

  The command-line entry exits at once after printing it: a failed Orbax save
  can leave Orbax threads waiting (up to 300 s) for a signal from the part of
  the save that failed, and the interpreter would wait for them at exit.
  """
