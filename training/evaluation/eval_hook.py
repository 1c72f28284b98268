"""The training loop's eval hook: held-out loss (and eval.tasks) every `eval_every` steps and
once at the end. `eval_every=-1` or `eval_batches=0` turn it off."""

import logging

import ml_collections

from training import data as data_lib
from training.evaluation import evals

log = logging.getLogger('loomax')


def eval_enabled(config: ml_collections.ConfigDict) -> bool:
  """eval_every=-1 or eval_batches=0 turn held-out eval off (periodic and final)."""
  return config.eval_every >= 0 and config.eval_batches > 0


def evaluate(eval_step, params, batches) -> float:
  total = count = 0.0
  for b in batches:
    t, c = eval_step(params, b)
    total, count = total + float(t), count + float(c)
  return total / max(count, 1.0)


def held_out_batches(config: ml_collections.ConfigDict, program, process_index: int,
                     process_count: int) -> list:
  """The held-out device batches (packed rows of seq_len, in the program's layout)."""
  if not eval_enabled(config):
    return []
  return [program.global_batch(b) for b in data_lib.make_eval_batches(
      config, num_batches=config.eval_batches, process_index=process_index,
      process_count=process_count)]


class EvalHook:
  """`due(step)`: a periodic eval (never at the last step: the final eval runs there);
  `hook(step, state)` writes eval/* and task rows; `final(step, state)` returns eval/*."""

  def __init__(self, config: ml_collections.ConfigDict, program, batches: list, writer):
    self.on = eval_enabled(config)
    self.every, self.last = config.eval_every, config.steps
    self.eval_step, self.batches, self.writer = program.eval_step, batches, writer
    self.per_byte = data_lib.tokens_per_byte(batches)   # None without byte counts
    self.tasks = evals.in_training(config, program)    # eval.tasks beyond 'loss': {} when none

  def due(self, step: int) -> bool:
    return self.on and self.every > 0 and step % self.every == 0 and step != self.last

  def _run(self, step: int, state) -> dict[str, float]:
    loss = evaluate(self.eval_step, state.params, self.batches)
    row = data_lib.eval_row(loss, self.per_byte)
    self.writer.write(step, {**row, **self.tasks(state.params)})
    return row

  def __call__(self, step: int, state) -> None:
    row = self._run(step, state)
    log.info('eval at step %d: loss %.4f', step, row['eval/loss'])

  def final(self, step: int, state) -> dict[str, float]:
    if not self.on:
      return {}
    row = self._run(step, state)
    log.info('final eval at step %d: loss %.4f', step, row['eval/loss'])
    return row
