"""The offline default: a byte-level model on the Python standard library, ~4 min on 2 CPU cores.

    python train.py --config configs/tiny.py --workdir runs/tiny
"""

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.steps = 300
  c.batch_size = 16
  c.seq_len = 256
  c.log_every = 25
  c.eval_every = 100
  return c
