"""Launcher: python train.py --config configs/tiny.py --workdir runs/tiny [--config.KEY=VAL ...]"""

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where metrics, TensorBoard events and checkpoints go.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(message)s')
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and Grain narrate every step at INFO
  from training import loop  # after flag parsing, so --help stays fast
  row = loop.run(flags.FLAGS.config, flags.FLAGS.workdir)
  logging.getLogger('loomax').info('done: %s', {k: round(v, 4) if isinstance(v, float) else v
                                                for k, v in row.items()})


def cli():
  """The loomax-train console script (pyproject.toml)."""
  app.run(main)


if __name__ == '__main__':
  cli()
