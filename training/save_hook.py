"""The training loop's checkpoint hook: saves every `checkpoint.every` steps, and only steps
known to be finite (the metrics log tracks that)."""

import ml_collections

from training import checkpointing


class SaveHook:
  """`due(step)`: a periodic save is due; `hook(step, state, force=)` saves the state with the
  data iterator's position (force: also when the step is not on the cadence, e.g. the final
  step or a stop request)."""

  def __init__(self, config: ml_collections.ConfigDict, saver: checkpointing.Saver, train_iter,
               is_finite):
    self.every = config.checkpoint.every
    self.saver, self.train_iter, self.is_finite = saver, train_iter, is_finite

  def due(self, step: int) -> bool:
    return bool(self.every) and step % self.every == 0

  def __call__(self, step: int, state, force: bool = False) -> None:
    self.saver.save(step, state, self.train_iter.get_state(), self.is_finite(step), force=force)
