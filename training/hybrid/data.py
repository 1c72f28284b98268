"""The training loop's hybrid-data-parallel parts: whole documents in, planned steps out.

ByteScale (Ge et al., 2025), section 6 (data-aware scheduling): the planner needs the global
batch's length metadata, so with `parallelism.hybrid_dp.enabled` the pipeline yields whole
documents (not packed rows), every process reads the same global stream and computes the same
plan (`hybrid_dp.plan`), and the step runs it (`hybrid_program.HybridProgram`). Documents come whole up
to `parallelism.hybrid_dp.max_doc_len` tokens (default: the longest one the pool holds), so the
corpus's long tail reaches the planner; only longer ones are cut, into pieces of that length.
`seq_len` is then only the held-out eval row length.
"""

import logging

import grain
import ml_collections
import numpy as np
from jax.sharding import Mesh

from parallelism.hybrid import planner as hybrid_dp
from parallelism.hybrid.groups import pool_size
from training.hybrid import executor as hybrid_exec
from training.data import packing, sources

log = logging.getLogger('loomax')


def max_doc_len(h: ml_collections.ConfigDict) -> int:
  """The longest document fed whole: `parallelism.hybrid_dp.max_doc_len`, where 0 means
  capacity x the largest layout (the longest document the pool holds in one group)."""
  return int(h.max_doc_len) or int(h.capacity) * max(int(g) for g in h.layouts)


def check_config(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  h = config.parallelism.hybrid_dp
  hybrid_exec.check_config(config, mesh)
  if config.parallelism.context_impl != 'none':
    raise ValueError('parallelism.hybrid_dp.enabled runs its own ring per group: set '
                     f'parallelism.context_impl=none (got {config.parallelism.context_impl!r})')
  if config.data.source not in sources.DOCUMENT_SOURCES:
    raise ValueError(f'parallelism.hybrid_dp.enabled needs a document source; data.source='
                     f'{config.data.source!r}, valid: {sources.DOCUMENT_SOURCES}')
  layouts = hybrid_dp.check_layouts(h.layouts, pool_size(mesh))
  if not isinstance(h.max_doc_len, int) or h.max_doc_len < 0 or h.max_doc_len == 1:
    raise ValueError(f'parallelism.hybrid_dp.max_doc_len={h.max_doc_len!r}: give the longest '
                     'document in tokens (>= 2: an input and its target), or 0 for '
                     'capacity x the largest layout')
  limit = max_doc_len(h)
  # Documents come whole up to `limit` tokens (longer ones in pieces of `limit`): the longest
  # must fit the largest group.
  try:
    hybrid_dp.degree(limit, h.capacity, layouts)
  except ValueError as e:
    raise ValueError(f'parallelism.hybrid_dp.max_doc_len={h.max_doc_len} ({limit} tokens): '
                     f'{e}') from None
  # seq_len is no training length here: it is the held-out eval row length (eval/loss runs
  # packed rows of seq_len on the static mesh). Rows longer than any training document would
  # score positions training never reaches.
  if config.seq_len > limit:
    raise ValueError(f'seq_len={config.seq_len} (with hybrid DP, the eval row length) is longer '
                     f'than parallelism.hybrid_dp.max_doc_len={h.max_doc_len} ({limit} tokens; '
                     '0 = parallelism.hybrid_dp.capacity x the largest layout), the longest '
                     'document training sees: lower seq_len or raise max_doc_len')


def stream_changes(config: ml_collections.ConfigDict,
                   changes: dict[str, tuple]) -> list[str]:
  """Keys changed since a checkpoint ({key: (saved, now)}) that make its document-stream state
  describe another stream: the source, order and batch, and the length documents are cut at
  (a checkpoint from before max_doc_len existed cut them at its seq_len)."""
  out = [k for k in changes if k in ('batch_size', 'seed') or k.startswith('data.')]
  h = config.parallelism.hybrid_dp
  saved = lambda key, now: changes[key][0] if key in changes else now  # noqa: E731
  key = 'parallelism.hybrid_dp.max_doc_len'
  then = saved(key, h.max_doc_len)
  if then is None:
    then = saved('seq_len', config.seq_len)
  elif then == 0:
    then = (saved('parallelism.hybrid_dp.capacity', h.capacity) *
            max(saved('parallelism.hybrid_dp.layouts', h.layouts)))
  if then != max_doc_len(h):
    out.append(f'{key} (documents cut at {then} tokens in the checkpoint, '
               f'{max_doc_len(h)} now)')
  return out


class _CutLongDocuments(packing.SplitDocument):
  """Documents whole up to `limit` tokens; longer ones in next-token pieces of at most `limit`
  (neighbours share their boundary token, so every target is trained exactly once). Says so
  once, at the first cut."""

  def __init__(self, limit: int):
    super().__init__(limit - 1)
    self._limit = limit
    self._logged = False

  def flat_map(self, element) -> list[dict[str, np.ndarray]]:
    pieces = super().flat_map(element)
    if len(pieces) > 1 and not self._logged:
      self._logged = True
      n = len(element['tokens'] if isinstance(element, dict) else element)
      log.info('hybrid DP data: a document of %d tokens is longer than '
               'parallelism.hybrid_dp.max_doc_len=%d: cut into %d pieces (logged once; every '
               'longer document is cut so, none dropped)', n, self._limit, len(pieces))
    return pieces


def _piece_tokens(piece: dict[str, np.ndarray]) -> np.ndarray:
  """A packing piece (inputs t[i:j], targets t[i+1:j+1]) as the tokens t[i:j+1]."""
  return np.concatenate([piece['inputs'], piece['targets'][-1:]]).astype(np.int32)


def make_train_iterator(config: ml_collections.ConfigDict) -> grain.DatasetIterator:
  """Endless batches of `batch_size` documents (lists of int32 token arrays): each document
  whole up to `max_doc_len` tokens, longer ones as consecutive pieces of at most that length;
  documents of one token (nothing to predict) are skipped, as packing does. The same global
  stream on every process; checkpointable (get_state / set_state) like the packed pipeline."""
  limit = max_doc_len(config.parallelism.hybrid_dp)
  if limit < 2:
    raise ValueError(f'parallelism.hybrid_dp.max_doc_len={limit}: a document needs >= 2 tokens')
  log.info('hybrid DP data: whole documents up to %d tokens (parallelism.hybrid_dp.max_doc_len)'
           '; longer ones cut into pieces of that length', limit)
  docs = grain.MapDataset.source(sources.make_document_source(config, 'train'))
  if config.data.shuffle:
    docs = docs.shuffle(seed=config.seed)
  ds = docs.repeat().to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=32))
  ds = ds.apply(_CutLongDocuments(limit)).map(_piece_tokens)
  return iter(ds.batch(config.batch_size, drop_remainder=True, batch_fn=list))
