"""The training and eval input pipelines: source -> split -> shard -> shuffle -> pack -> batch.

Built on grain, so the training iterator checkpoints exactly (get_state/set_state, or Orbax via
grain.checkpoint.CheckpointSave/CheckpointRestore).
"""

import functools
import math
import time
from typing import Callable

import grain
import numpy as np
from absl import flags

from checkpoint.errors import UserError
from training.data import mixture, packing, position, sources, tasks, tokenizer

SOURCES = sources.DOCUMENT_SOURCES + tasks.TASK_SOURCES
_EVAL_OVERSAMPLE = 64  # windows read per window used: a wide sample, bounded reads
_PACKING_SEED_SALT = 0x9E3779B9  # packing's bin shuffle must not reuse the document-order seed


def local_batch_size(config, process_count: int) -> int:
  """Rows each process loads per step: batch_size // process_count."""
  if process_count < 1 or config.batch_size % process_count:
    raise UserError(f'batch_size={config.batch_size} is not divisible by the process count '
                    f'{process_count}.')
  return config.batch_size // process_count


def batch_keys(config) -> tuple[str, ...]:
  """The arrays of a train batch: document sources add 'target_bytes' (bits per byte)."""
  keys = ('inputs', 'targets', 'segment_ids', 'positions')
  return keys + (('target_bytes',) if config.data.source in sources.DOCUMENT_SOURCES else ())


def _check_source(config) -> None:
  if config.data.source not in SOURCES:
    raise UserError(f'data.source={config.data.source!r} is unknown; choose one of {SOURCES}.')
  spec = config.data.get('tokenizer', 'bytes')
  if config.data.source in tasks.TASK_SOURCES and spec != 'bytes':
    raise UserError(f'data.tokenizer={spec!r} applies to document sources only; '
                    f'data.source={config.data.source!r} generates its own token ids '
                    "(set data.tokenizer='bytes').")


def _local_documents(config, split: str, process_index: int, process_count: int, *,
                     shuffle: bool, start: int = 0) -> tuple[grain.MapDataset, int]:
  """(one process's documents of `split` by local index (see `_rows`), how many documents
  the split has)."""
  docs = mixture.documents(config, split)   # one source, or data.mixture's weighted mix
  if len(docs) == 0:
    raise UserError(f'data.source={config.data.source!r} has no {split} documents '
                     f'(data.paths={config.data.paths!r}, '
                     f'data.eval_fraction={config.data.eval_fraction}).')
  if shuffle and not mixture.shuffled_inside(config):
    # Shuffle globally, then shard: the order is the same for any process count. grain adds
    # the epoch to the seed under repeat(): a new order each epoch.
    docs = docs.shuffle(seed=config.seed)
  return docs.repeat()[start + process_index::process_count], len(docs)


def document_length(config, *, process_index: int = 0, process_count: int = 1,
                    start: int = 0) -> Callable[[int], int]:
  """Token count of local training document j (reads it)."""
  local, _ = _local_documents(config, 'train', process_index, process_count,
                              shuffle=config.data.shuffle, start=start)
  return lambda j: len(local[j])


def _rows(config, split: str, process_index: int, process_count: int, *,
          shuffle: bool, start: int = 0, skip: frozenset[int] = frozenset(),
          trim: dict[int, list] | None = None
          ) -> tuple[grain.IterDataset, Callable[[int], int]]:
  """Unbatched, endless rows of one process's share of `split`, tagged with stream positions.

  The stream is global (its order does not depend on the process count): process p takes
  global positions start + p + n*j (see training/data/position.py). Returns the rows and a
  function giving the piece count of local document j (for the position tracker). At a length
  curriculum's stage boundary (training/data/curriculum.py), local documents in `skip` are read
  as empty (the previous stage emitted them completely) and those in `trim` only in the token
  ranges it gives (what the previous stage left of them).
  """
  trim = trim or {}
  _check_source(config)
  if not 0 <= process_index < process_count:
    raise UserError(f'process_index={process_index} must be in [0, {process_count}).')
  if config.data.source in tasks.TASK_SOURCES:
    # Examples are random by index already; the split picks a disjoint random stream.
    rows = grain.MapDataset.source(tasks.make_task_source(config, split))
    rows = rows.repeat()[start + process_index::process_count].map_with_index(_tag_row)
    # Generation is CPU-bound Python: reader threads only fight over the GIL (measured 8x slower
    # with grain's default 16 threads).
    return rows.to_iter_dataset(grain.ReadOptions(num_threads=0)), lambda j: 1
  local, n_docs = _local_documents(config, split, process_index, process_count,
                                   shuffle=shuffle, start=start)
  _check_trainable(config, n_docs, local, process_index, process_count)
  # A few reader threads hide file latency; grain's default (16 threads, 500 docs) is too much here.
  read = grain.ReadOptions(num_threads=config.data.get('read_threads', 2),
                           prefetch_buffer_size=config.data.get('read_prefetch', 32))
  tag = (functools.partial(_tag_document, frozenset(skip), dict(trim)) if skip or trim
         else _tag_document)
  rows = packing.pack_documents(
      local.map_with_index(tag).to_iter_dataset(read), seq_len=config.seq_len,
      num_packing_bins=config.data.num_packing_bins,
      seed=(config.seed + _PACKING_SEED_SALT) % 2**32,
      shuffle_window=config.data.shuffle_window if shuffle else 0, tracked=True)
  return (rows.map(_byte_counter(config)),
          lambda j: 0 if j in skip else len(packing.piece_spans(len(local[j]), config.seq_len,
                                                                trim.get(j))))


def _check_trainable(config, n_docs: int, local, process_index: int,
                     process_count: int) -> None:
  """A share with no document of 2 or more tokens would make packing wait forever: refuse it
  at start-up, naming the paths. Reads documents until the first trainable one (one, for any
  ordinary corpus), over at most one epoch of this process's share."""
  for j in range(n_docs):
    if len(local[j]) >= 2:
      return
  share = f' in the share of process {process_index} of {process_count}' \
      if process_count > 1 else ''
  raise UserError(f'data.paths={config.data.paths!r}: no training document has 2 or more '
                  f'tokens{share} ({n_docs} documents): nothing to train on',
                  hint='check that the files are not empty (data.eval_paths is only read for '
                  'eval)')


def _byte_counter(config) -> Callable[[dict], dict]:
  """Adds 'target_bytes' to a row: the UTF-8 bytes of text each target token stands for, so the
  step can report bits per byte (comparable across tokenizers)."""
  table = tokenizer.load(config.data.get('tokenizer', 'bytes')).token_bytes()
  return functools.partial(_add_target_bytes, table)


def _add_target_bytes(table: np.ndarray, row: dict) -> dict:
  return {**row, 'target_bytes': tokenizer.target_bytes(table, row['targets'])}


def _tag_document(*args) -> dict:
  """(index, tokens) or (skip, trim, index, tokens) -> a tracked document: empty when skipped,
  restricted to its ranges when trimmed."""
  *cuts, index, tokens = args
  out = {'tokens': tokens, 'doc': index}
  if cuts and index in cuts[0]:
    out['tokens'] = np.zeros(0, np.int32)
  elif cuts and index in cuts[1]:
    out['ranges'] = cuts[1][index]
  return out


def _tag_row(index: int, row: dict) -> dict:
  return {**row, 'doc': np.int32(index), 'pieces': np.int32(1)}


def _eval_pieces(config, process_index: int, process_count: int, needed: int) -> list:
  """Held-out windows of seq_len + 1 tokens drawn across the whole eval split.

  Taking the first documents in order would measure a handful of files; instead every
  document is cut into windows and a fixed-seed sample of all windows is kept.
  """
  docs = mixture.eval_documents(config)
  order = np.random.default_rng(config.seed).permutation(len(docs))[process_index::process_count]
  if len(order) == 0:
    raise UserError(f'data.source={config.data.source!r} has no eval documents for process '
                    f'{process_index} of {process_count} (data.eval_fraction='
                    f'{config.data.eval_fraction}); give a separate eval corpus with '
                    'data.eval_paths, or turn eval off with eval_every=-1 or eval_batches=0.')
  L = config.seq_len
  windows, cap = [], _EVAL_OVERSAMPLE * needed
  for i in order:
    tokens = np.asarray(docs[int(i)], np.int32)
    windows.extend(tokens[j:j + L + 1] for j in range(0, max(len(tokens) - 1, 0), L))
    if len(windows) >= cap:
      break
  if not windows:
    raise UserError('the eval split has no document of 2 or more tokens')
  picked = np.random.default_rng(config.seed + 1).permutation(len(windows))
  return [windows[k] for k in picked]


def make_train_dataset(config, *, process_index: int = 0, process_count: int = 1,
                       start: int = 0, skip: frozenset[int] = frozenset(),
                       trim: dict[int, list] | None = None) -> grain.IterDataset:
  """The training pipeline as a grain IterDataset (iterate it for batches).

  `start`: the global stream position this run begins at (0, or a resume point); `skip` and
  `trim`: local documents to read as empty or in part (see `_rows`).
  """
  ds, count_pieces = _rows(config, 'train', process_index, process_count,
                           shuffle=config.data.shuffle, start=start, skip=skip, trim=trim)
  ds = ds.batch(local_batch_size(config, process_count), drop_remainder=True)
  if config.data.worker_count > 0:
    # grain's workers read absl flags; a caller that never parsed flags (a script, a notebook)
    # would crash there, so fall back to the flag defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.worker_count))
  return position.PositionTracker(ds, start=start, process_index=process_index,
                                  process_count=process_count, count_pieces=count_pieces)


def make_train_iterator(config, *, process_index: int = 0, process_count: int = 1,
                        start: int = 0, skip: frozenset[int] = frozenset(),
                        trim: dict[int, list] | None = None) -> grain.DatasetIterator:
  """Infinite iterator of host-local batches.

  Each batch is a dict of int32 arrays [batch_size // process_count, seq_len]: inputs, targets
  (-1 = no loss), segment_ids (0 = padding) and positions. The iterator has get_state/set_state
  and works with grain.checkpoint.CheckpointSave/CheckpointRestore; `position()` gives its
  place in the global stream (training/data/position.py). One length: a length curriculum's
  stages are `training.data.make_train_iterator`'s (training/data/curriculum.py).
  """
  return iter(make_train_dataset(config, process_index=process_index,
                                 process_count=process_count, start=start, skip=skip,
                                 trim=trim))


def resume_train_iterator(config, saved: dict[int, dict], *, process_index: int = 0,
                          process_count: int = 1) -> tuple[grain.DatasetIterator, str]:
  """The training iterator continued from per-process states `saved` ({process: get_state()}).

  Same process count: each process restores its own state exactly ('exact'). Otherwise the
  stream restarts at the saved resume point with empty buffers ('remapped'); what that
  guarantees is stated in training/data/position.py.
  """
  mine = saved.get(process_index)
  if mine is not None and mine['position']['process_count'] == process_count:
    it = make_train_iterator(config, process_index=process_index, process_count=process_count,
                             start=mine['position']['start'])
    it.set_state(mine)
    return it, 'exact'
  start = position.resume_point(saved)
  return make_train_iterator(config, process_index=process_index, process_count=process_count,
                             start=start), 'remapped'


def make_eval_batches(config, *, num_batches: int, process_index: int = 0,
                      process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """Deterministic held-out batches (the same every call); cycles if the eval split is small."""
  if config.data.source in sources.DOCUMENT_SOURCES:
    rows = local_batch_size(config, process_count)
    pieces = _eval_pieces(config, process_index, process_count, num_batches * rows)
    docs = grain.MapDataset.source(pieces).repeat().to_iter_dataset(
        grain.ReadOptions(num_threads=0))
    ds = packing.pack_documents(docs, seq_len=config.seq_len,
                                num_packing_bins=config.data.num_packing_bins,
                                seed=(config.seed + _PACKING_SEED_SALT) % 2**32
                                ).map(_byte_counter(config))
  else:
    ds = _rows(config, 'eval', process_index, process_count, shuffle=False)[0]
  it = iter(ds.batch(local_batch_size(config, process_count), drop_remainder=True))
  return [{k: v for k, v in next(it).items() if k not in packing.TRACKING_KEYS}
          for _ in range(num_batches)]


def tokens_per_byte(batches: list[dict]) -> float | None:
  """Target tokens per byte of text over (global) batches carrying 'target_bytes'; None when
  they carry none (synthetic and task sources)."""
  if not batches or 'target_bytes' not in batches[0]:
    return None
  import jax.numpy as jnp  # the batches may be global jax arrays spread over processes
  tokens = sum(float(jnp.sum(b['targets'] >= 0)) for b in batches)
  nbytes = sum(float(jnp.sum(b['target_bytes'])) for b in batches)
  return tokens / nbytes if nbytes else None


def eval_row(loss: float, per_byte: float | None) -> dict[str, float]:
  """The eval metrics from the mean loss (nats/token): plus bits/byte when bytes are known."""
  row = {'eval/loss': loss}
  if per_byte is not None:
    row['eval/bits_per_byte'] = loss * per_byte / math.log(2)
  return row


def measure_tokens_per_sec(config, seconds: float = 3.0) -> float:
  """Training-pipeline throughput on this process, in token positions (padding included) per s."""
  it = make_train_iterator(config)
  next(it)  # exclude start-up (file listing, hashing, first reads)
  tokens, start = 0, time.perf_counter()
  while (elapsed := time.perf_counter() - start) < seconds:
    tokens += next(it)['inputs'].size
  return tokens / elapsed
