"""Launcher: python train.py --config configs/tiny.py --workdir runs/tiny [--config.KEY=VAL ...]"""

import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where metrics, TensorBoard events and checkpoints go.')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv):
  """absl's parser, with a one-line error (and a suggestion) for an unknown config key."""
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as e:  # how ml_collections reports an unknown key
    from training import overrides
    message = overrides.unknown_key_error(argv) or str(e).strip('\'"').splitlines()[0]
    print(f'train.py: error: {message}', file=sys.stderr)
    sys.exit(2)


def main(argv):
  del argv
  # Orbax and Grain narrate every step at INFO; loomax's own logger stays at INFO on
  # process 0 (training.monitor.setup_logging), and absl's handler prints it to stderr.
  absl_logging.set_verbosity(absl_logging.WARNING)
  from parallelism import xla_flags  # before any backend starts: XLA reads them once
  xla_flags.apply(flags.FLAGS.config)
  from training import loop  # after flag parsing, so --help stays fast
  row = loop.run(flags.FLAGS.config, flags.FLAGS.workdir)
  loop.log.info('done: %s', {k: round(v, 4) if isinstance(v, float) else v
                             for k, v in row.items()})


def cli():
  """The loomax-train console script (pyproject.toml)."""
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  cli()
