"""The training loop's profiler hook: a jax.profiler trace of steps
[profile_start, profile_start + profile_steps) into workdir/tb, on process 0."""

import os

import jax
import ml_collections


class ProfileHook:

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.start, self.steps = config.profile_start, config.profile_steps
    self.on = bool(self.steps) and jax.process_index() == 0
    self.logdir = os.path.join(workdir, 'tb')
    self.active = False

  def before_step(self, step: int) -> None:
    if self.on and step == self.start:
      jax.profiler.start_trace(self.logdir)
      self.active = True

  def after_step(self, step: int, metrics) -> None:
    """Stops after the last profiled step, once its results are ready."""
    if self.active and step >= self.start + self.steps - 1:
      jax.block_until_ready(metrics)
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
