"""Random-access document sources (text files, JSON lines, ArrayRecord) and the held-out split.

Each source maps an index to one document as int32 token ids and names it by a stable key, so the
train/eval split and per-process shards are deterministic and independent of where data lives.
"""

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from training.data import tokenizer

_GLOB_CHARS = frozenset('*?[')
_CHUNK_BYTES = 64 << 20  # jsonl line indexing reads files in pieces of this size


class DocumentSource(Protocol):
  """What the pipeline needs of a source: random access to documents and their keys."""

  def __len__(self) -> int: ...
  def __getitem__(self, index: int) -> np.ndarray: ...
  def key(self, index: int) -> str: ...
  def keys(self) -> list[str]: ...


def stdlib_python_files() -> list[str]:
  """The Python standard library's own .py files (the offline default corpus), sorted."""
  root = sysconfig.get_paths()['stdlib']
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Third-party packages are not the stdlib and differ between machines.
    dirnames[:] = sorted(d for d in dirnames if d not in ('site-packages', 'dist-packages'))
    files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith('.py'))
  return sorted(files)


def resolve_paths(paths: str) -> list[str]:
  """Expands comma-separated globs (recursive `**` allowed) into a sorted list of files."""
  patterns = [p.strip() for p in paths.split(',') if p.strip()]
  if not patterns:
    raise ValueError("data.paths is empty; give comma-separated globs, e.g. 'data/*.txt'.")
  files = set()
  for pattern in patterns:
    pattern = os.path.expanduser(pattern)
    if not any(c in pattern for c in _GLOB_CHARS) and os.path.isdir(pattern):
      pattern = os.path.join(pattern, '**', '*')
    files.update(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
  if not files:
    raise ValueError(f'data.paths={paths!r} matched no files.')
  return sorted(files)


def relative_keys(files: Sequence[str]) -> list[str]:
  """Names files relative to their common directory, so moving the data keeps the split."""
  files = [os.path.abspath(f) for f in files]
  root = os.path.commonpath([os.path.dirname(f) for f in files])
  return [os.path.relpath(f, root) for f in files]


def eval_mask(keys: Sequence[str], eval_fraction: float) -> np.ndarray:
  """True where a document belongs to the held-out split, by a stable (unsalted) hash of its key."""
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f'data.eval_fraction={eval_fraction} must be in [0, 1).')
  # blake2b rather than hash(): Python's str hash is salted per process.
  h = np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), 'little')
                for k in keys], dtype=np.uint64)
  return (h >> np.uint64(11)).astype(np.float64) / 2.0**53 < eval_fraction


class TextFileSource:
  """One document per file; bytes are the tokens. Files are read lazily in __getitem__."""

  def __init__(self, files: Sequence[str]):
    self._files = list(files)
    self._keys = relative_keys(self._files)

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> np.ndarray:
    with open(self._files[index], 'rb') as f:
      return tokenizer.encode(f.read())

  def key(self, index: int) -> str:
    return self._keys[index]

  def keys(self) -> list[str]:
    return list(self._keys)


def _line_spans(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Byte [start, end) of every line of `path` (without the newline), read in chunks."""
  newlines = []
  offset = 0
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK_BYTES):
      newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord('\n')) + offset)
      offset += len(chunk)
  ends = np.concatenate(newlines + [np.array([offset], np.int64)]).astype(np.int64)
  starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
  if starts[-1] >= offset:  # the file ends with '\n': no line after it
    starts, ends = starts[:-1], ends[:-1]
  return starts, ends


class JsonlSource:
  """One document per non-blank line of JSON-lines files: the `text_field` of each object."""

  def __init__(self, files: Sequence[str], text_field: str):
    self._files = list(files)
    self._file_keys = relative_keys(self._files)
    self._text_field = text_field
    file_ids, starts, ends, line_numbers = [], [], [], []
    for i, path in enumerate(self._files):
      s, e = _line_spans(path)
      keep = e - s > 1  # blank lines ('' or a lone '\r') are not documents
      file_ids.append(np.full(int(keep.sum()), i, np.int32))
      starts.append(s[keep])
      ends.append(e[keep])
      line_numbers.append(np.flatnonzero(keep) + 1)
    self._file_ids = np.concatenate(file_ids)
    self._starts = np.concatenate(starts)
    self._ends = np.concatenate(ends)
    self._line_numbers = np.concatenate(line_numbers)

  def __len__(self) -> int:
    return len(self._starts)

  def __getitem__(self, index: int) -> np.ndarray:
    path = self._files[self._file_ids[index]]
    where = f'{path}:{self._line_numbers[index]}'
    with open(path, 'rb') as f:
      f.seek(int(self._starts[index]))
      line = f.read(int(self._ends[index] - self._starts[index]))
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{where}: not valid JSON ({e}).') from None
    if not isinstance(record, dict) or self._text_field not in record:
      raise ValueError(f'{where}: no field data.text_field={self._text_field!r} in this line.')
    text = record[self._text_field]
    if not isinstance(text, str):
      raise TypeError(f'{where}: field {self._text_field!r} is {type(text).__name__}, '
                      'not a string.')
    return tokenizer.encode(text)

  def key(self, index: int) -> str:
    return f'{self._file_keys[self._file_ids[index]]}:{self._line_numbers[index]}'

  def keys(self) -> list[str]:
    return [f'{self._file_keys[f]}:{n}'
            for f, n in zip(self._file_ids, self._line_numbers, strict=True)]


class ArrayRecordSource:
  """One document per ArrayRecord record, stored as int32 little-endian token ids."""

  def __init__(self, files: Sequence[str], vocab_size: int):
    from array_record.python import array_record_data_source  # only this source needs it
    self._files = list(files)
    self._file_keys = relative_keys(self._files)
    self._vocab_size = vocab_size
    self._readers = [array_record_data_source.ArrayRecordDataSource([f]) for f in self._files]
    self._offsets = np.cumsum([0] + [len(r) for r in self._readers])

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def _locate(self, index: int) -> tuple[int, int]:
    file_id = int(np.searchsorted(self._offsets, index, side='right')) - 1
    return file_id, index - int(self._offsets[file_id])

  def __getitem__(self, index: int) -> np.ndarray:
    file_id, record = self._locate(index)
    data = self._readers[file_id][record]
    if len(data) % 4:
      raise ValueError(f'{self._files[file_id]} record {record}: {len(data)} bytes is not a '
                       'whole number of int32 token ids.')
    tokens = np.frombuffer(data, dtype='<i4').astype(np.int32)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self._vocab_size):
      raise ValueError(f'{self._files[file_id]} record {record}: token ids span '
                       f'[{tokens.min()}, {tokens.max()}], outside [0, model.vocab_size='
                       f'{self._vocab_size}).')
    return tokens

  def key(self, index: int) -> str:
    file_id, record = self._locate(index)
    return f'{self._file_keys[file_id]}:{record}'

  def keys(self) -> list[str]:
    return [f'{k}:{r}' for k, reader in zip(self._file_keys, self._readers, strict=True)
            for r in range(len(reader))]


class SubsetSource:
  """The documents of `base` at `indices` (one split of it), still random access."""

  def __init__(self, base: DocumentSource, indices: np.ndarray):
    self._base = base
    self._indices = np.asarray(indices, dtype=np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> np.ndarray:
    return self._base[int(self._indices[index])]

  def key(self, index: int) -> str:
    return self._base.key(int(self._indices[index]))

  def keys(self) -> list[str]:
    return [self.key(i) for i in range(len(self))]


DOCUMENT_SOURCES = ('local_text', 'text', 'jsonl', 'array_record')


def make_document_source(config, split: str) -> SubsetSource:
  """The train or eval documents of a file-backed `config.data.source`."""
  if split not in ('train', 'eval'):
    raise ValueError(f"split={split!r}; choose 'train' or 'eval'.")
  name = config.data.source
  vocab_size = config.model.vocab_size
  # data.eval_paths: a separate eval corpus; then every document of data.paths trains.
  eval_paths = config.data.get('eval_paths', '').strip()
  paths = eval_paths if eval_paths and split == 'eval' else config.data.paths
  if name == 'local_text':
    tokenizer.check_byte_vocab(vocab_size, name)
    base = TextFileSource(resolve_paths(paths) if paths.strip() else stdlib_python_files())
  elif name == 'text':
    tokenizer.check_byte_vocab(vocab_size, name)
    base = TextFileSource(resolve_paths(paths))
  elif name == 'jsonl':
    tokenizer.check_byte_vocab(vocab_size, name)
    base = JsonlSource(resolve_paths(paths), config.data.text_field)
  elif name == 'array_record':
    base = ArrayRecordSource(resolve_paths(paths), vocab_size)
  else:
    raise ValueError(f'data.source={name!r} is not a document source; choose one of '
                     f'{DOCUMENT_SOURCES}.')
  if eval_paths:
    return SubsetSource(base, np.arange(len(base)))
  held_out = eval_mask(base.keys(), config.data.eval_fraction)
  return SubsetSource(base, np.flatnonzero(held_out if split == 'eval' else ~held_out))
