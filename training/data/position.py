"""The training stream's global position, so a checkpoint resumes on any number of processes.

The training stream is one global sequence of examples (documents, or task rows), in a seeded
order that does not depend on the process count: epoch e is permutation e of the train split,
and global position g is element g of the concatenated epochs. A run with n processes that
starts at global position `start` gives process p the positions start + p + n*j, j = 0, 1, ...
(its "local index" j).

Each process's pipeline tags every token it packs with its document's local index and piece
count; `PositionTracker` (the last stage of the pipeline) reads and strips those tags and keeps a
watermark: the lowest local index whose document has not been emitted completely. A checkpoint
stores, per process, the exact grain iterator state and the tracker (start, p, n, watermark).

What resume guarantees (`resume_train_iterator`):
  * Same process count (any mesh, any device count): exact. Every process restores its own
    grain state, so the batches after the checkpoint are identical to an uninterrupted run.
  * Different process count: the new run starts at G = min over saved processes p of
    (start + p + n * watermark_p), with empty packing and shuffle buffers. Every document at a
    global position below G had been emitted completely before the checkpoint, and every
    document at a position >= G is read again, so no document is skipped. Documents at
    positions >= G that were emitted, in whole or in part, before the checkpoint are seen
    again: at most the documents read before the checkpoint at positions >= G, i.e. those that
    were in flight in the piece-shuffle window and packing bins (plus ones that finished
    while an older one was still in flight). Task sources (synthetic, passkey, mqar) have no
    buffers: every process has emitted the same number of rows, so G is exactly
    steps * batch_size and the resumed stream has neither gaps nor repeats (each step sees the
    same set of rows as an uninterrupted run; only their order within the global batch
    differs).
"""

from typing import Any, Callable

import grain
import numpy as np

from training.data.packing import TRACKING_KEYS

_COMPACT_AT = 4096  # resolve never-seen documents at the watermark once this many are pending


class PositionTracker(grain.IterDataset):
  """Strips the position tags off batches and tracks which documents are complete.

  `count_pieces(j)` gives the piece count of local document j by reading it; it is only called
  for a document that blocks the watermark without having been seen (an empty document makes
  no pieces, so it never appears in a batch).
  """

  def __init__(self, parent: grain.IterDataset, *, start: int, process_index: int,
               process_count: int, count_pieces: Callable[[int], int]):
    super().__init__(parent)
    self._where = dict(start=start, process_index=process_index, process_count=process_count)
    self._count_pieces = count_pieces

  def __iter__(self):
    return _TrackerIterator(self._parent.__iter__(), self._where, self._count_pieces)

  def __str__(self) -> str:
    return f'PositionTracker({self._where})'


class _TrackerIterator(grain.DatasetIterator):

  def __init__(self, parent, where: dict[str, int], count_pieces: Callable[[int], int]):
    super().__init__(parent)
    self._where = where
    self._count_pieces = count_pieces
    self._watermark = 0
    self._pending: dict[int, list[int]] = {}  # local index -> [pieces emitted, pieces in all]
    self._emitted: dict[int, list[int]] = {}  # local index -> indices of its pieces emitted

  def __next__(self):
    batch = next(self._parent)
    doc, pieces = batch['doc'], batch['pieces']
    if doc.ndim == 1:  # task rows: one row is one whole example
      starts_doc, starts_pieces = doc, pieces
    else:  # packed rows: a piece starts where its positions restart inside a segment
      first = (batch['segment_ids'] > 0) & (batch['positions'] == 0)
      starts_doc, starts_pieces = doc[first], pieces[first]
      if 'piece' in batch:
        for j, k in zip(starts_doc.tolist(), batch['piece'][first].tolist()):
          self._emitted.setdefault(j, []).append(k)
    ids, counts = np.unique(starts_doc, return_counts=True)
    total = dict(zip(starts_doc.tolist(), starts_pieces.tolist()))
    for j, c in zip(ids.tolist(), counts.tolist()):
      entry = self._pending.setdefault(j, [0, total[j]])
      entry[0] += c
    self._advance(resolve=len(self._pending) > _COMPACT_AT)
    return {k: v for k, v in batch.items() if k not in TRACKING_KEYS}

  def _advance(self, resolve: bool) -> None:
    while True:
      entry = self._pending.get(self._watermark)
      if entry is None:
        if not (resolve and self._pending):
          return
        n = self._count_pieces(self._watermark)
        if n > 0:  # read but not emitted yet: still in flight
          self._pending[self._watermark] = [0, n]
          return
      elif entry[0] < entry[1]:
        return
      else:
        del self._pending[self._watermark]
        self._emitted.pop(self._watermark, None)
      self._watermark += 1

  def position(self) -> dict[str, int]:
    """Where this process stands: (start, process_index, process_count, watermark)."""
    self._advance(resolve=True)
    return {**self._where, 'watermark': self._watermark}

  def get_state(self) -> dict[str, Any]:
    pos = self.position()
    return {'parent': self._parent.get_state(), 'position': pos,
            'pending': {str(j): e for j, e in self._pending.items()},
            'emitted': {str(j): list(k) for j, k in self._emitted.items()}}

  def set_state(self, state: dict[str, Any]) -> None:
    saved = {k: v for k, v in state['position'].items() if k != 'watermark'}
    if saved != self._where:
      raise ValueError(f'data iterator state was saved at {saved}, this iterator is at '
                       f'{self._where}; rebuild it with resume_train_iterator')
    self._parent.set_state(state['parent'])
    self._watermark = int(state['position']['watermark'])
    self._pending = {int(j): list(e) for j, e in state['pending'].items()}
    self._emitted = {int(j): list(k) for j, k in state.get('emitted', {}).items()}


def resume_point(saved: dict[int, dict[str, Any]]) -> int:
  """The lowest global position not emitted completely by every saved process: G."""
  positions = [s['position'] for s in saved.values()]
  n = positions[0]['process_count']
  if sorted(saved) != list(range(n)) or any(p['process_count'] != n for p in positions):
    raise ValueError(f'data iterator states for processes {sorted(saved)} do not form one run '
                     f'of {n} processes')
  return min(p['start'] + p['process_index'] + n * p['watermark'] for p in positions)
