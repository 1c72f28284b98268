"""The training loop's metrics hook: finishes each dispatched step one step late (so dispatch
stays asynchronous), checks it is finite, times it and writes the logged rows (train/*, perf/*,
the program's telemetry) to metrics.jsonl, TensorBoard, the progress bar and the log."""

import dataclasses
import logging
import math
import sys
from typing import Any, Callable

import jax
import ml_collections

from training.metrics import perf, throughput
from training.checkpointing import NonFiniteLoss, is_finite_step

log = logging.getLogger('loomax')

# Metrics the row names itself (the rest of the step's metrics are copied as they are).
_NAMED = ('loss', 'lr', 'grad_norm', 'param_norm', 'tokens', 'skipped')


@dataclasses.dataclass
class Dispatched:
  """A step whose results are still on the device."""
  step: int
  metrics: dict[str, jax.Array]
  real_tokens: int         # non-padding tokens of the global batch
  data_wait_s: float       # next() on the iterator plus the host-to-device transfer
  timed: bool = True       # False: it compiled its program (timed alone, not in a window)


class MetricsLog:
  """`dispatched(d, state, batch)` after each step's dispatch finishes the previous step;
  `flush(state, batch)` finishes the pending one now (before a save, an eval or the end).
  `state` and `batch` (the latest) feed the telemetry's per-row figures."""

  def __init__(self, config: ml_collections.ConfigDict, *, start: int, writer, progress,
               timing: throughput.Throughput, telemetry, describe_last_good: Callable[[], str]):
    self.config, self.start = config, start
    self.writer, self.progress, self.timing, self.telemetry = writer, progress, timing, telemetry
    self.describe_last_good = describe_last_good
    self.log_lines = not (progress.active and sys.stderr.isatty())  # a log file gets the rows
    self.pending: Dispatched | None = None
    self.last_row: dict[str, Any] = {}
    self.finite_step, self.finite_ok = start, True   # whether the state after it may be saved
    self.skipped = 0
    self.compile_logged = False   # perf/compile_s goes into the first row only

  def is_finite(self, step: int) -> bool:
    """Whether the state after `step` is known finite (so it may be saved)."""
    return self.finite_ok and self.finite_step == step

  def dispatched(self, d: Dispatched, state, batch) -> None:
    self.flush(state, batch)
    self.pending = d

  def flush(self, state, batch) -> None:
    if self.pending is not None:
      self._finish(self.pending, state, batch)
      self.pending = None

  def _finish(self, d: Dispatched, state, batch) -> None:
    step, metrics, c = d.step, d.metrics, self.config
    loss = float(metrics['loss'])
    self._check(step, loss, {k: float(metrics[k]) for k in
                             ('loss', 'grad_norm', 'param_norm', 'skipped') if k in metrics})
    if d.timed:  # a step that compiled was timed alone
      self.timing.step_done(d.real_tokens, d.data_wait_s)
    if not (step % c.log_every == 0 or step == c.steps):
      self.progress.update(step)
      return
    perf_row = self.timing.row()
    row = {'train/loss': loss, 'train/perplexity': math.exp(min(loss, 50.0)),
           'train/lr': float(metrics['lr']), 'train/grad_norm': float(metrics['grad_norm']),
           'train/param_norm': float(metrics['param_norm']), **perf_row}
    if self.timing.compile_s is not None and not self.compile_logged:
      row['perf/compile_s'] = self.timing.compile_s
      self.compile_logged = True
    row.update({k: float(v) for k, v in metrics.items() if k not in _NAMED})
    row.update(self.telemetry.row(state.params, batch))
    if c.optimizer.skip_nonfinite:
      row['train/skipped_steps'] = self.skipped
    mem = perf.device_memory_bytes()
    if mem:
      row['perf/device_memory_bytes'] = mem
    self.writer.write(step, row)
    self.last_row = row
    self.progress.update(step, loss, perf_row.get('perf/tokens_per_sec'))
    if self.log_lines:
      log.info('%s', throughput.log_line(step, loss, perf_row))

  def _check(self, step: int, loss: float, checked: dict[str, float]) -> None:
    """Records whether the step is finite; a skipped update is counted, any other non-finite
    step stops the run (it is never saved)."""
    self.finite_step, self.finite_ok = step, is_finite_step(checked)
    if checked.get('skipped'):
      self.skipped += 1
      log.warning('step %d: non-finite update skipped (loss %s, grad norm %s; %d skipped so '
                  'far)', step, loss, checked['grad_norm'], self.skipped)
    elif not self.finite_ok:
      raise NonFiniteLoss(f'non-finite values at step {step} (loss {loss}, grad norm '
                          f'{checked["grad_norm"]}, param norm {checked["param_norm"]}); '
                          f'stopping without saving it; {self.describe_last_good()} (lower '
                          'optimizer.lr, check the data, enable optimizer.clip_norm, or set '
                          'optimizer.skip_nonfinite=True)')
