"""Launcher: python train.py --config configs/tiny.py --workdir runs/tiny [--config.KEY=VAL ...]

Exit status (training/safety/errors.py): 0 finished; 2 a user error (one line, plus a hint); 3 stopped
on non-finite values; 128+N stopped by signal N after saving (SIGTERM 143, SIGINT 130), with
the final line "stopped at step N, saved; resume with the same command"; 1 a bug (traceback).
--debug (or LOOMAX_DEBUG=1) shows the traceback of a user error too.
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where metrics, TensorBoard events and checkpoints go.')
flags.DEFINE_bool('debug', False, 'Show tracebacks for user errors too (or LOOMAX_DEBUG=1).')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv):
  """absl's parser, with a one-line error (and a suggestion) for an unknown config key."""
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError, ValueError) as e:  # ml_collections: unknown key, bad value
    from training import overrides
    message = overrides.unknown_key_error(argv) or str(e).strip('\'"').splitlines()[0]
    print(f'train.py: error: {message}', file=sys.stderr)
    sys.exit(2)


def main(argv):
  del argv
  # Orbax and Grain narrate every step at INFO; loomax's own logger stays at INFO on
  # process 0 (training.metrics.monitor.setup_logging), and absl's handler prints it to stderr.
  absl_logging.set_verbosity(absl_logging.WARNING)
  from parallelism import xla_flags  # before any backend starts: XLA reads them once
  xla_flags.apply(flags.FLAGS.config)
  from training.safety import errors, stop  # after flag parsing, so --help stays fast
  log = logging.getLogger('loomax')
  debug = flags.FLAGS.debug or errors.debug_enabled([])
  try:
    from training import loop
    row = loop.run(flags.FLAGS.config, flags.FLAGS.workdir)
  except errors.UserError as e:
    if debug:
      raise
    for line in errors.user_error_lines('train.py', e):
      print(line, file=sys.stderr)
    sys.exit(errors.EXIT_USER_ERROR)
  except BaseException as e:  # noqa: BLE001 - a stop or a non-finite run is not a bug
    status = stop.exit_status(e) or getattr(e, 'exit_status', None)
    if status is None or isinstance(e, SystemExit):
      raise
    if stop.exit_status(e) is not None:
      log.warning('%s', stop.final_line(e))
    else:
      log.error('%s', str(e).splitlines()[0] if str(e) else type(e).__name__)
    sys.exit(status)
  log.info('done: %s', {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})


def cli():
  """The loomax-train console script (pyproject.toml)."""
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  cli()
