"""The error class for everything caused by input (a config key, a data file, a path, a
checkpoint, a command-line flag) rather than by a bug in loomax.

A leaf module with no imports, so checkpoint/ and parallelism/ may raise it without importing
training/; training/safety/errors.py re-exports it and turns it into a one-line CLI error (status 2).
"""


class UserError(ValueError):
  """Input the user can fix. str(e) is the one-line message (naming the key, file or flag);
  `hint` is at most one more line saying what to do."""

  def __init__(self, message: str, hint: str | None = None):
    super().__init__(message)
    self.hint = hint
