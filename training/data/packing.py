"""Turns variable-length documents into fixed-length packed rows with grain's first-fit packer.

Documents are cut into next-token pieces of at most seq_len, so none is truncated or dropped;
each piece becomes its own segment (positions restart at 0).
"""

from typing import Any

import grain
import numpy as np

# Sets no real limit: the iterator-level flat map keeps only one document's pieces in memory.
_MAX_PIECES_PER_DOCUMENT = 2**31
# Per-token position tags of tracked documents (padding -1): the document's stream position, its
# piece count and the piece's index.
TRACKING_KEYS = ('doc', 'pieces', 'piece')


def num_pieces(num_tokens: int, seq_len: int) -> int:
  """How many pieces SplitDocument cuts a document of `num_tokens` tokens into."""
  return -(-max(num_tokens - 1, 0) // seq_len)


def piece_spans(num_tokens: int, seq_len: int,
                ranges: list | None = None) -> list[tuple[int, int]]:
  """Token spans [s, e) of the pieces SplitDocument cuts (inputs t[s:e-1], targets t[s+1:e]).

  `ranges` ([start, end) token ranges) restricts the document to those ranges, each cut on its
  own: what is left of a document when some of its pieces were already trained (a length
  curriculum's stage boundary, training/data/curriculum.py).
  """
  out = []
  for a, b in (ranges or [(0, num_tokens)]):
    n = min(b, num_tokens) - a - 1
    out += [(a + i, a + min(i + seq_len, n) + 1) for i in range(0, max(n, 0), seq_len)]
  return out


class SplitDocument(grain.experimental.FlatMapTransform):
  """Tokens t[0..n] -> pieces {inputs: t[i:j], targets: t[i+1:j+1]} with j - i <= seq_len.

  A tracked document ({'tokens', 'doc'}: its stream position) also tags every token of its
  pieces with `doc`, the document's piece count `pieces` and the piece's index `piece`, so the
  consumer can tell when a document has been emitted completely and which pieces of it were
  (training/data/position.py). Its optional 'ranges' restrict it (see `piece_spans`).
  """

  max_fan_out = _MAX_PIECES_PER_DOCUMENT

  def __init__(self, seq_len: int):
    self._seq_len = seq_len

  def flat_map(self, element) -> list[dict[str, np.ndarray]]:
    tracked = isinstance(element, dict)
    tokens = np.asarray(element['tokens'] if tracked else element, np.int32)
    # A document of one token (or none) has nothing to predict: no spans.
    spans = piece_spans(len(tokens), self._seq_len, element.get('ranges') if tracked else None)
    pieces = [{'inputs': tokens[s:e - 1], 'targets': tokens[s + 1:e]} for s, e in spans]
    if tracked:
      for k, p in enumerate(pieces):
        p['doc'] = np.full(len(p['inputs']), element['doc'], np.int32)
        p['pieces'] = np.full(len(p['inputs']), len(pieces), np.int32)
        p['piece'] = np.full(len(p['inputs']), k, np.int32)
    return pieces


def _to_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames grain's packed features to the batch keys the model reads."""
  row = {'inputs': packed['inputs'], 'targets': packed['targets'],
         'segment_ids': packed['inputs_segment_ids'], 'positions': packed['inputs_positions']}
  for key in TRACKING_KEYS:
    if key in packed:
      row[key] = packed[key]
  return row


def pack_documents(docs: grain.IterDataset, *, seq_len: int, num_packing_bins: int,
                   seed: int, shuffle_window: int = 0, tracked: bool = False) -> grain.IterDataset:
  """Documents (int32 token arrays) -> rows of `seq_len` with segment_ids and positions.

  Padding (at the end of a row) has input 0, target -1, segment 0 and position 0.
  `shuffle_window` > 0 shuffles pieces within a window, so a long document's pieces spread
  over many batches instead of filling consecutive ones. `tracked`: documents are
  {'tokens', 'doc'} and rows keep the per-token TRACKING_KEYS.
  """
  if num_packing_bins < 1:
    raise ValueError(f'data.num_packing_bins={num_packing_bins} must be >= 1.')
  pieces = grain.experimental.FlatMapIterDataset(docs, SplitDocument(seq_len))
  if shuffle_window > 0:
    pieces = grain.experimental.WindowShuffleIterDataset(pieces, window_size=shuffle_window,
                                                         seed=seed)
  length: Any = {'inputs': seq_len, 'targets': seq_len}
  padding: Any = {'inputs': 0, 'targets': -1}
  if tracked:
    length.update({k: seq_len for k in TRACKING_KEYS})
    padding.update({k: -1 for k in TRACKING_KEYS})
  packed = grain.experimental.FirstFitPackIterDataset(
      pieces, length_struct=length, num_packing_bins=num_packing_bins, seed=seed,
      padding_struct=padding)
  return packed.map(_to_row)
