"""Where metrics go: TensorBoard events, metrics.jsonl and a progress bar (process 0 only)."""

import logging
import math
import os
from typing import Mapping

import jax
import tqdm
from tensorboardX import SummaryWriter

from training.safety import run_files


class MetricWriter:
  """Writes each row to TensorBoard (`workdir/tb`) and as one JSON line to metrics.jsonl."""

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self.tb = SummaryWriter(os.path.join(workdir, 'tb'))
      self.jsonl = run_files.JsonLines(os.path.join(workdir, run_files.METRICS))

  def write(self, step: int, row: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in row.items() if v is not None}
    for tag, value in clean.items():
      if math.isfinite(value):
        self.tb.add_scalar(tag, value, step)
    self.jsonl.write({'step': step, **clean})  # one whole line per row (training/safety/run_files.py)
    self.tb.flush()

  def close(self) -> None:
    if self.enabled:
      self.tb.close()
      self.jsonl.close()


class Progress:
  """A tqdm bar showing step, loss, tokens/s and ETA; silent off process 0."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self.active = enabled and jax.process_index() == 0
    self.bar = tqdm.tqdm(total=total, initial=initial, dynamic_ncols=True, unit='step',
                         disable=not self.active)

  def update(self, step: int, loss: float | None = None, tokens_per_sec: float | None = None):
    if loss is not None:
      post = {'loss': f'{loss:.4f}'}
      if tokens_per_sec:
        post['tok/s'] = f'{tokens_per_sec:,.0f}'
      self.bar.set_postfix(post, refresh=False)
    self.bar.update(step - self.bar.n)

  def close(self):
    self.bar.close()


def setup_logging() -> None:
  """Makes loomax's INFO lines (mesh, parameters, resume, step rows, eval) visible on process
  0 and keeps other processes to warnings. Under absl the root logger stops at WARNING, so
  the level is set on the 'loomax' logger itself; a level a caller chose is left alone."""
  logger = logging.getLogger('loomax')
  if logger.level == logging.NOTSET:
    logger.setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
