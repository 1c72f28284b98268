"""loomax input pipeline (grain): packed next-token batches from text, ArrayRecord or tasks."""

from training.data.pipeline import (
    SOURCES,
    local_batch_size,
    make_eval_batches,
    make_train_dataset,
    make_train_iterator,
    measure_tokens_per_sec,
    resume_train_iterator,
)

__all__ = [
    'SOURCES',
    'local_batch_size',
    'make_eval_batches',
    'make_train_dataset',
    'make_train_iterator',
    'measure_tokens_per_sec',
    'resume_train_iterator',
]
