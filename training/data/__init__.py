"""loomax input pipeline (grain): packed next-token batches from text, ArrayRecord or tasks."""

from training.data import curriculum, pipeline
from training.data.pipeline import (
    SOURCES,
    batch_keys,
    eval_row,
    local_batch_size,
    make_eval_batches,
    make_train_dataset,
    measure_tokens_per_sec,
    tokens_per_byte,
)


def make_train_iterator(config, *, process_index: int = 0, process_count: int = 1,
                        start: int = 0, **kwargs):
  """The run's training iterator (`pipeline.make_train_iterator`); with `data.length_schedule`
  a `curriculum.CurriculumIterator`, each stage's batches in that stage's shape."""
  if config.data.length_schedule:
    return curriculum.CurriculumIterator(config, process_index=process_index,
                                         process_count=process_count, start=start)
  return pipeline.make_train_iterator(config, process_index=process_index,
                                      process_count=process_count, start=start, **kwargs)


def resume_train_iterator(config, saved: dict, *, process_index: int = 0,
                          process_count: int = 1):
  """`pipeline.resume_train_iterator`, or the curriculum's resume into the right stage."""
  resume = curriculum.resume if config.data.length_schedule else pipeline.resume_train_iterator
  return resume(config, saved, process_index=process_index, process_count=process_count)


__all__ = [
    'SOURCES',
    'batch_keys',
    'eval_row',
    'local_batch_size',
    'make_eval_batches',
    'make_train_dataset',
    'make_train_iterator',
    'measure_tokens_per_sec',
    'resume_train_iterator',
    'tokens_per_byte',
]
