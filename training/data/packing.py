"""Turns variable-length documents into fixed-length packed rows with grain's first-fit packer.

Documents are cut into next-token pieces of at most seq_len, so none is truncated or dropped;
each piece becomes its own segment (positions restart at 0).
"""

from typing import Any

import grain
import numpy as np

# Sets no real limit: the iterator-level flat map keeps only one document's pieces in memory.
_MAX_PIECES_PER_DOCUMENT = 2**31


class SplitDocument(grain.experimental.FlatMapTransform):
  """Tokens t[0..n] -> pieces {inputs: t[i:j], targets: t[i+1:j+1]} with j - i <= seq_len."""

  max_fan_out = _MAX_PIECES_PER_DOCUMENT

  def __init__(self, seq_len: int):
    self._seq_len = seq_len

  def flat_map(self, element: np.ndarray) -> list[dict[str, np.ndarray]]:
    tokens = np.asarray(element, np.int32)
    n = len(tokens) - 1  # a document of one token (or none) has nothing to predict
    return [{'inputs': tokens[i:min(i + self._seq_len, n)],
             'targets': tokens[i + 1:min(i + self._seq_len, n) + 1]}
            for i in range(0, max(n, 0), self._seq_len)]


def _to_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames grain's packed features to the batch keys the model reads."""
  return {'inputs': packed['inputs'], 'targets': packed['targets'],
          'segment_ids': packed['inputs_segment_ids'], 'positions': packed['inputs_positions']}


def pack_documents(docs: grain.IterDataset, *, seq_len: int, num_packing_bins: int,
                   seed: int, shuffle_window: int = 0) -> grain.IterDataset:
  """Documents (int32 token arrays) -> rows of `seq_len` with segment_ids and positions.

  Padding (at the end of a row) has input 0, target -1, segment 0 and position 0.
  `shuffle_window` > 0 shuffles pieces within a window, so a long document's pieces spread
  over many batches instead of filling consecutive ones.
  """
  if num_packing_bins < 1:
    raise ValueError(f'data.num_packing_bins={num_packing_bins} must be >= 1.')
  pieces = grain.experimental.FlatMapIterDataset(docs, SplitDocument(seq_len))
  if shuffle_window > 0:
    pieces = grain.experimental.WindowShuffleIterDataset(pieces, window_size=shuffle_window,
                                                         seed=seed)
  length: Any = {'inputs': seq_len, 'targets': seq_len}
  packed = grain.experimental.FirstFitPackIterDataset(
      pieces, length_struct=length, num_packing_bins=num_packing_bins, seed=seed,
      padding_struct={'inputs': 0, 'targets': -1})
  return packed.map(_to_row)
