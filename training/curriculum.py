"""A length curriculum's programs: one `TrainProgram` per stage of `data.length_schedule`
(training/data/curriculum.py), all built (and so checked: the context axis must divide every
stage's length, zigzag its double) at start-up, each compiled once, on its stage's first step.

`StagedProgram` stands in for the run's `TrainProgram`: train_step, eval_step and global_batch
pick the stage program whose (rows, length) match the batch, and everything else is the run's
own program (built at config.seq_len / batch_size: held-out eval and the initial state).
Parameters and optimizer state do not depend on the sequence length, so one state flows
through every stage.
"""

import logging
from typing import Any, Callable

import numpy as np

from training import perf, throughput
from training.data import curriculum as data_curriculum
from training.program import TrainProgram, build_program

log = logging.getLogger('loomax')


class StagedProgram:

  def __init__(self, config, mesh, build: Callable[..., TrainProgram] = build_program):
    if config.parallelism.hybrid_dp.enabled:
      raise ValueError(f'{data_curriculum.KEY}={config.data.length_schedule!r}: hybrid data '
                       'parallelism feeds whole documents, not fixed-length stages; unset one')
    self.base = build(config, mesh)
    self.stages = data_curriculum.parse(config)
    self._programs = {(config.batch_size, config.seq_len): self.base}
    for s in self.stages:
      key = (s.batch_size, s.seq_len)
      if key not in self._programs:
        try:
          self._programs[key] = build(data_curriculum.stage_config(config, s), mesh)
        except ValueError as e:
          raise ValueError(f'{data_curriculum.KEY} stage {s.start}:{s.seq_len}:{s.batch_size}:'
                           f' {e}') from None
    log.info('length schedule: %s', ', '.join(
        f'from step {s.start}: {s.batch_size} x {s.seq_len}' for s in self.stages))

  def __getattr__(self, name: str) -> Any:
    return getattr(self.__dict__['base'], name)

  def program_for(self, batch: dict) -> TrainProgram:
    rows, length = np.shape(batch['inputs'])
    key = (rows * self._process_count(batch), length)
    if key not in self._programs:
      raise ValueError(f'a batch of {key[0]} x {key[1]} matches no stage of '
                       f'{data_curriculum.KEY}')
    return self._programs[key]

  @staticmethod
  def _process_count(batch) -> int:
    import jax
    x = batch['inputs']
    return 1 if isinstance(x, jax.Array) else jax.process_count()  # host rows are local

  def train_step(self, state, batch):
    return self.program_for(batch).train_step(state, batch)

  def eval_step(self, params, batch):
    return self.program_for(batch).eval_step(params, batch)

  def global_batch(self, local_batch: dict[str, np.ndarray]):
    return self.program_for(local_batch).global_batch(local_batch)

  @property
  def num_programs(self) -> int:
    return len(self._programs)


def build(config, mesh) -> TrainProgram | StagedProgram:
  """The run's program: staged when data.length_schedule is set."""
  if config.data.get('length_schedule', ''):
    return StagedProgram(config, mesh)
  return build_program(config, mesh)


def stage_throughput(config, host_batch, process_count: int, peak: float):
  """(seq_len, a fresh `Throughput` for the stage of `host_batch`): tokens per step and FLOPs
  per token of that stage's shape, so MFU is per stage."""
  rows, length = np.shape(host_batch['inputs'])
  return length, throughput.Throughput(rows * process_count * length,
                                       perf.train_flops_per_token(config.model, length), peak)
