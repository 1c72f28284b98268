"""Weighted data mixtures: `data.mixture` = ((source keys, weight), ...) mixed by grain.

Each component is a document source of its own (`data.source`, `data.paths`, `data.text_field`,
... given as a dict of data.* keys over the run's `data` section), split into train and eval
by its own stable hashes, checked on its own (its tokenizer against model.vocab_size, prepared
shards against the tokenizer that wrote them), shuffled by its own seed and repeated. grain's
`MapDataset.mix` then interleaves the components deterministically in the weights' proportions
(exact over any window, not only on average), so a resumed iterator continues exactly. Held-out
evaluation reads every component's eval split.

    c.data.mixture = (({'source': 'jsonl', 'paths': 'data/tinystories/*.jsonl'}, 0.3),
                      ({'source': 'jsonl', 'paths': 'data/wikipedia/*.jsonl'}, 0.3),
                      ({'source': 'array_record', 'paths': 'data/fineweb_edu/'}, 0.4))

The paper's recipe ("CART", Capps 2026: 30% TinyStories, 30% Wikipedia, 40% FineWeb-Edu) is
configs/cart_paper.py. Empty `data.mixture` = the single source of data.source (the default).
"""

from typing import Any

import grain
import ml_collections
import numpy as np

from training.data import sources

# Documents in one pass of the mixed stream: large enough never to wrap (grain cannot repeat an
# infinite dataset, and the pipeline repeats its documents).
_PASS = 2**62
# The keys of a component: the data.* keys that say where documents come from and how to read
# them; the rest (packing, shuffling, threads) stay the run's.
COMPONENT_KEYS = ('source', 'paths', 'text_field', 'tokenizer', 'decode_errors', 'eval_fraction',
                  'eval_paths')


def components(config) -> list[tuple[Any, float]]:
  """[(component config, normalised weight)] of `config.data.mixture`; [] when it is empty."""
  spec = config.data.get('mixture', ())
  if not spec:
    return []
  out = []
  for i, entry in enumerate(spec):
    try:
      keys, weight = entry
      keys = dict(keys)
    except (TypeError, ValueError):
      raise ValueError(f'data.mixture[{i}]={entry!r}: each entry is (dict of data.* keys, '
                       'weight)') from None
    unknown = sorted(set(keys) - set(COMPONENT_KEYS))
    if unknown:
      raise ValueError(f'data.mixture[{i}] sets {unknown}; a component may set '
                       f'{list(COMPONENT_KEYS)}')
    if not float(weight) > 0:
      raise ValueError(f'data.mixture[{i}] weight={weight}; weights must be > 0')
    if keys.get('source', config.data.source) not in sources.DOCUMENT_SOURCES:
      raise ValueError(f'data.mixture[{i}] source={keys.get("source")!r}; a component is a '
                       f'document source: {sources.DOCUMENT_SOURCES}')
    if keys.get('tokenizer', config.data.tokenizer) != config.data.tokenizer:
      raise ValueError(f'data.mixture[{i}] tokenizer={keys["tokenizer"]!r} differs from '
                       f'data.tokenizer={config.data.tokenizer!r}: the model reads one '
                       'vocabulary; prepare every component with the same tokenizer')
    c = ml_collections.ConfigDict(config.to_dict())
    c.data.mixture = ()
    c.data.update(keys)
    out.append((c, float(weight)))
  total = sum(w for _, w in out)
  return [(c, w / total) for c, w in out]


def documents(config, split: str) -> grain.MapDataset:
  """The documents of `split` as a MapDataset: the single source, or the weighted mixture
  (already shuffled inside each component when data.shuffle; the pipeline must not shuffle
  it again, which would blur the proportions over short windows)."""
  parts = components(config)
  if not parts:
    return grain.MapDataset.source(sources.make_document_source(config, split))
  mixed = []
  for i, (c, _) in enumerate(parts):
    docs = _component_source(c, split, i)   # its own split and tokenizer checks
    if len(docs) == 0:
      raise ValueError(f'data.mixture[{i}] ({c.data.source}, paths={c.data.paths!r}) has no '
                       f'{split} documents')
    ds = grain.MapDataset.source(docs)
    if config.data.shuffle:
      ds = ds.shuffle(seed=(config.seed * 1_000_003 + i) % 2**32)
    mixed.append(ds.repeat())
  return grain.MapDataset.mix(mixed, [w for _, w in parts])[:_PASS]


def shuffled_inside(config) -> bool:
  """True when `documents` already shuffled (a mixture): the pipeline skips its own shuffle."""
  return bool(config.data.get('mixture', ()))


class ConcatSource:
  """Documents of several sources one after another (a mixture's held-out splits)."""

  def __init__(self, parts):
    self._parts = list(parts)
    self._offsets = np.cumsum([0] + [len(p) for p in self._parts])

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def _locate(self, index: int):
    part = int(np.searchsorted(self._offsets, index, side='right')) - 1
    return self._parts[part], index - int(self._offsets[part]), part

  def __getitem__(self, index: int) -> np.ndarray:
    src, j, _ = self._locate(index)
    return src[j]

  def key(self, index: int) -> str:
    src, j, part = self._locate(index)
    return f'mixture[{part}]:{src.key(j)}'

  def keys(self) -> list[str]:
    return [self.key(i) for i in range(len(self))]


def eval_documents(config):
  """The held-out documents: the single source's eval split, or every component's."""
  parts = components(config)
  if not parts:
    return sources.make_document_source(config, 'eval')
  return ConcatSource(_component_source(c, 'eval', i) for i, (c, _) in enumerate(parts))


def _component_source(c, split: str, i: int):
  try:
    return sources.make_document_source(c, split)
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(f'data.mixture[{i}] ({c.data.source}, paths={c.data.paths!r}): {e}') \
        from None


def component_of(config, index: int) -> int:
  """Which component document `index` of the mixed stream comes from (for tests and reports)."""
  parts = components(config)
  probe = grain.MapDataset.mix(
      [grain.MapDataset.source([k]).repeat() for k in range(len(parts))],
      [w for _, w in parts])
  return int(probe[index])
