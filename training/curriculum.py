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

from training.metrics import perf, throughput
from training.data import curriculum as data_curriculum
from training import program as program_lib
from training.program import TrainProgram

log = logging.getLogger('loomax')


class StagedProgram:

  def __init__(self, config, mesh,
               build: Callable[..., TrainProgram] = program_lib.build_program):
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

  def prepare(self, host_batch):
    return self.program_for(host_batch).prepare(host_batch)

  def new_program(self, host_batch) -> bool:
    """True on the first batch of each stage (its program compiles on that step)."""
    shape = np.shape(host_batch['inputs'])
    new, self._current = shape != self.__dict__.get('_current'), shape
    return new

  def throughput(self, peak: float) -> 'StageThroughput':
    return StageThroughput(self.config.model, peak)

  def eval_step(self, params, batch):
    return self.program_for(batch).eval_step(params, batch)

  def global_batch(self, local_batch: dict[str, np.ndarray]):
    return self.program_for(local_batch).global_batch(local_batch)

  @property
  def num_programs(self) -> int:
    return len(self._programs)


class StageThroughput(throughput.Throughput):
  """Timing windows whose token count and FLOPs per token follow the stage: set from the
  (global) batch of each stage's first step, so tokens/s and MFU are per stage; rows carry
  the stage's `data/seq_len`."""

  def __init__(self, model_config, peak: float):
    super().__init__(None, None, peak)
    self.model_config, self.seq_len = model_config, None

  def first_step(self, dispatch, state, batch):
    rows, self.seq_len = batch['inputs'].shape
    self.total_tokens_per_step = rows * self.seq_len
    self.flops_per_token = perf.train_flops_per_token(self.model_config, self.seq_len)
    log.info('length schedule: a stage of %d x %d starts', rows, self.seq_len)
    return super().first_step(dispatch, state, batch)

  def row(self):
    return {**super().row(), 'data/seq_len': self.seq_len}


def build_program(config, mesh) -> TrainProgram | StagedProgram:
  """The run's program (`training.program.build_program`), staged when data.length_schedule
  is set."""
  if config.data.length_schedule:
    return StagedProgram(config, mesh)
  return program_lib.build_program(config, mesh)
