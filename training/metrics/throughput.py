"""Timing windows for the training log: tokens/s, step time, data wait and MFU per logged row.

A window covers the train steps between two logged rows and nothing else: the first step
after a (re)start is compiled, so it is timed alone and reported once as `perf/compile_s`;
eval and checkpoint saves run while the window is paused. Dispatch stays asynchronous: the
loop blocks on a step's result only where a window starts or pauses (docs/measuring.md).
"""

import logging
import math
import time
from typing import Any

import jax
import numpy as np

from training.metrics import perf

log = logging.getLogger('loomax')


def real_tokens(local_batch: Any) -> int:
  """Non-padding tokens (segment_ids > 0) in one host batch, or in a list of whole documents
  (hybrid data parallelism: int32 token arrays, every token real)."""
  if isinstance(local_batch, dict):
    return int(np.count_nonzero(np.asarray(local_batch['segment_ids'])))
  return int(sum(np.asarray(doc).size for doc in local_batch))


class Throughput:
  """Counts active seconds, steps, tokens and data-wait time between logged rows.

  `total_tokens_per_step`: token positions per step (batch_size x seq_len, padding included;
  None: the step's real tokens, for steps of whole documents); `flops_per_token`: train FLOPs
  per token position (training/metrics/perf.py; None: no MFU); `peak`: the FLOP/s MFU divides by.
  """

  def __init__(self, total_tokens_per_step: int | None, flops_per_token: float | None,
               peak: float):
    self.total_tokens_per_step = total_tokens_per_step
    self.flops_per_token = flops_per_token
    self.peak = peak
    self.compile_s: float | None = None
    self._reset(running=False)

  def _reset(self, running: bool):
    self._t0 = time.perf_counter() if running else None
    self._active = 0.0
    self.steps = 0
    self.real_tokens = 0
    self.data_wait_s = 0.0

  # -- the first step of a (re)start: its call traces and compiles ---------------------------
  def first_step(self, dispatch, *args):
    """Runs `dispatch(*args)` (the first train step of this process), blocks on its result and
    starts the first window after it, so compilation never counts as throughput."""
    t0 = time.perf_counter()
    out = dispatch(*args)
    jax.block_until_ready(out)
    # A step compiled ahead of time (training/program.py CompiledOnce) counts that compile too.
    self.compile_s = time.perf_counter() - t0 + getattr(dispatch, 'compile_s', 0.0)
    log.info('first step (trace + compile + one step) took %.1f s; logged as perf/compile_s '
             'and left out of tokens/s', self.compile_s)
    self._reset(running=True)
    return out

  # -- per step -----------------------------------------------------------------------------
  def step_done(self, real_tokens_global: int, data_wait_s: float) -> None:
    """One timed step finished: its non-padding tokens (all processes) and the seconds the
    loop waited for its batch (next() on the iterator plus the host-to-device transfer)."""
    self.steps += 1
    self.real_tokens += real_tokens_global
    self.data_wait_s += data_wait_s

  # -- eval and checkpoints run outside the window -------------------------------------------
  def pause(self, pending=None) -> None:
    """Stops the clock; `pending` (device values of the last dispatched step) is waited for
    first, so its compute time stays inside the window."""
    if pending is not None:
      jax.block_until_ready(pending)
    if self._t0 is not None:
      self._active += time.perf_counter() - self._t0
      self._t0 = None

  def resume(self) -> None:
    if self._t0 is None and self.compile_s is not None:
      self._t0 = time.perf_counter()

  # -- a logged row -------------------------------------------------------------------------
  def row(self) -> dict[str, float]:
    """perf/* figures of the window since the last row, then a new window. Empty when no
    timed step finished yet (for example the compiled first step was the only one)."""
    active = self._active + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)
    steps, real, wait = self.steps, self.real_tokens, self.data_wait_s
    running = self._t0 is not None
    self._reset(running=running)
    if steps == 0 or active <= 0:
      return {}
    per_step = self.total_tokens_per_step
    tps = (steps * per_step if per_step is not None else real) / active
    out = {'perf/tokens_per_sec': tps, 'perf/real_tokens_per_sec': real / active,
           'perf/step_time_s': active / steps, 'perf/data_wait_s': wait / steps}
    if self.flops_per_token is None:
      return out
    mfu = tps * self.flops_per_token / self.peak
    if mfu > 1.0:
      log.warning('MFU %.2f > 1 is a measurement error (the matmul peak %.3g FLOP/s is too low: '
                  'a loaded machine while measuring?); not recorded. Set perf.peak_flops.',
                  mfu, self.peak)
    elif math.isfinite(mfu):
      out['perf/mfu'] = mfu
    return out


def log_line(step: int, loss: float, perf_row: dict[str, float]) -> str:
  """The one-line log of a row: step, loss, tokens/s (total and real), MFU, step and wait time."""
  parts = [f'step {step}', f'loss {loss:.4f}']
  if 'perf/tokens_per_sec' in perf_row:
    parts.append(f"tokens/s {perf_row['perf/tokens_per_sec']:,.0f} "
                 f"(real {perf_row['perf/real_tokens_per_sec']:,.0f})")
    parts.append(f"MFU {perf_row['perf/mfu']:.1%}" if 'perf/mfu' in perf_row
                 else 'MFU n/a')
    parts.append(f"step {perf_row['perf/step_time_s'] * 1e3:,.1f} ms")
    parts.append(f"data wait {perf_row['perf/data_wait_s'] * 1e3:,.1f} ms")
  return ' | '.join(parts)


def matmul_peak(config, mesh) -> float:
  """perf.peak_flops, or the best of perf.peak_trials matmul timings (logged once)."""
  if config.perf.peak_flops:  # per device, as accelerator data sheets state it
    log.info('MFU against perf.peak_flops=%.3g FLOP/s per device x %d (given, not measured)',
             config.perf.peak_flops, mesh.devices.size)
    return config.perf.peak_flops * mesh.devices.size
  trials = perf.measure_peak_trials(mesh, trials=config.perf.peak_trials)
  log.info('matmul peak over %d device(s): best of %d trials %.3g FLOP/s (median %.3g, '
           'worst %.3g); MFU divides by the best', mesh.devices.size, len(trials), max(trials),
           float(sorted(trials)[len(trials) // 2]), min(trials))
  return max(trials)
