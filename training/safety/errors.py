"""How a loomax command ends: exit statuses and one-line errors for user mistakes.

Exit statuses of train.py (docs/clusters.md):
  0    finished: every step trained and the last one saved
  1    a bug (a Python traceback)
  2    a user error (config, data, paths, checkpoints, flags): one line plus at most a hint
  3    stopped on non-finite values (nothing non-finite saved; see the message)
  128+N  stopped by signal N after saving its step (SIGTERM 143, SIGINT 130), as shells report
       a signal: a preempted run is never mistaken for a finished one
Scripts use 0, 1 and 2 the same way. Tracebacks are for bugs; `--debug` on the command line or
LOOMAX_DEBUG=1 in the environment shows them for user errors too.
"""

import os
import sys
from typing import Callable

from checkpoint.errors import UserError

__all__ = ['UserError', 'EXIT_FINISHED', 'EXIT_BUG', 'EXIT_USER_ERROR', 'EXIT_NON_FINITE',
           'debug_enabled', 'user_error_lines', 'run_cli']

EXIT_FINISHED = 0
EXIT_BUG = 1
EXIT_USER_ERROR = 2
EXIT_NON_FINITE = 3


def debug_enabled(argv: list[str] | None = None) -> bool:
  argv = sys.argv if argv is None else argv
  return '--debug' in argv or os.environ.get('LOOMAX_DEBUG', '') not in ('', '0')


def user_error_lines(prog: str, error: BaseException) -> list[str]:
  """`prog: error: message` (first line of it only) and, if any, `hint: ...`."""
  message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  lines = [f'{prog}: error: {message}']
  hint = getattr(error, 'hint', None)
  if hint:
    lines.append(f'hint: {hint}')
  return lines


def run_cli(main: Callable[[], object], prog: str | None = None) -> None:
  """Runs a script's `main()`: a UserError ends it with one line (plus a hint) on stderr and
  status 2; anything else is a bug and keeps its traceback. `--debug` is taken out of sys.argv
  (scripts do not define it) and re-raises user errors with their traceback."""
  prog = prog or os.path.basename(sys.argv[0])
  debug = debug_enabled()
  while '--debug' in sys.argv:
    sys.argv.remove('--debug')
  try:
    result = main()
  except UserError as e:
    if debug:
      raise
    for line in user_error_lines(prog, e):
      print(line, file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  if isinstance(result, int):
    sys.exit(result)
