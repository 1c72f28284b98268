"""loomax input pipeline (grain): packed next-token batches from text, ArrayRecord or tasks."""

from training.data.pipeline import (
    SOURCES,
    batch_keys,
    eval_row,
    local_batch_size,
    make_eval_batches,
    make_train_dataset,
    make_train_iterator,
    measure_tokens_per_sec,
    resume_train_iterator,
    tokens_per_byte,
)

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
