"""Random-access document sources (text files, JSON lines, ArrayRecord) and the held-out split.

Each source maps an index to one document as int32 token ids and names it by a stable key, so the
train/eval split and per-process shards are deterministic and independent of where data lives.
"""

import glob
import gzip
import hashlib
import io
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from checkpoint.errors import UserError
from training.data import tokenizer

_GLOB_CHARS = frozenset('*?[')
_CHUNK_BYTES = 64 << 20  # jsonl line indexing reads files in pieces of this size


class DocumentSource(Protocol):
  """What the pipeline needs of a source: random access to documents and their keys."""

  def __len__(self) -> int: ...
  def __getitem__(self, index: int) -> np.ndarray: ...
  def key(self, index: int) -> str: ...
  def keys(self) -> list[str]: ...
  def doc_hashes(self) -> np.ndarray: ...  # uint64 per document, stable: decides the split


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
    raise UserError("data.paths is empty; give comma-separated globs, e.g. 'data/*.txt'.")
  files = set()
  for pattern in patterns:
    pattern = os.path.expanduser(pattern)
    if not any(c in pattern for c in _GLOB_CHARS) and os.path.isdir(pattern):
      pattern = os.path.join(pattern, '**', '*')
    files.update(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
  if not files:
    raise UserError(f'data.paths={paths!r} matched no files.')
  return sorted(files)


def relative_keys(files: Sequence[str]) -> list[str]:
  """Names files relative to their common directory, so moving the data keeps the split."""
  files = [os.path.abspath(f) for f in files]
  root = os.path.commonpath([os.path.dirname(f) for f in files])
  return [os.path.relpath(f, root) for f in files]


def key_hashes(keys: Sequence[str]) -> np.ndarray:
  """A stable (unsalted) 64-bit hash per key: blake2b, as Python's str hash is salted."""
  return np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), 'little')
                   for k in keys], dtype=np.uint64)


def mix_hashes(file_hashes: np.ndarray, file_ids: np.ndarray, numbers: np.ndarray) -> np.ndarray:
  """Stable per-document hashes from its file's hash and its number inside the file, computed
  on whole arrays (splitmix64 finaliser), so 10M documents need no Python object each."""
  z = file_hashes[file_ids] ^ (np.asarray(numbers, np.uint64) * np.uint64(0x9E3779B97F4A7C15))
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def eval_mask_of_hashes(hashes: np.ndarray, eval_fraction: float) -> np.ndarray:
  """True where a document belongs to the held-out split, by its stable hash."""
  if not 0.0 <= eval_fraction < 1.0:
    raise UserError(f'data.eval_fraction={eval_fraction} must be in [0, 1).')
  return (hashes >> np.uint64(11)).astype(np.float64) / 2.0**53 < eval_fraction


def eval_mask(keys: Sequence[str], eval_fraction: float) -> np.ndarray:
  """True where a document belongs to the held-out split, by a stable hash of its key."""
  return eval_mask_of_hashes(key_hashes(keys), eval_fraction)


def looks_binary(data: bytes) -> int:
  """Offset of the first NUL byte (text never has one), or -1."""
  return data.find(b'\0')


def decode_text(data: bytes, where: str, errors: str = 'strict') -> str:
  """UTF-8 text of a document; a binary or undecodable one is an error naming `where`."""
  if (nul := looks_binary(data)) >= 0:
    raise UserError(f'{where}: looks binary (NUL byte at offset {nul}), not a text document; '
                    'remove it from the paths.')
  try:
    return data.decode('utf-8', errors=errors)
  except UnicodeDecodeError as e:
    raise UserError(f'{where}: not valid UTF-8 at byte {e.start} ({e.reason}); fix or remove '
                    "the file, or decode with errors='replace' (data.decode_errors / "
                    '--errors).') from None


def _tokenize(tok, data: bytes, where: str, errors: str) -> np.ndarray:
  if tok is None or tok.spec == 'bytes':  # bytes are the tokens: no decoding
    if (nul := looks_binary(data)) >= 0:
      raise UserError(f'{where}: looks binary (NUL byte at offset {nul}), not a text '
                      'document; remove it from the paths.')
    return tokenizer.encode(data)
  return tok.encode(decode_text(data, where, errors))


class TextFileSource:
  """One document per file, tokenised by `tok` (None: bytes). Files are read lazily."""

  def __init__(self, files: Sequence[str], tok=None, errors: str = 'strict'):
    self._files = list(files)
    self._keys = relative_keys(self._files)
    self._tok, self._errors = tok, errors

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> np.ndarray:
    with open(self._files[index], 'rb') as f:
      return _tokenize(self._tok, f.read(), self._files[index], self._errors)

  def key(self, index: int) -> str:
    return self._keys[index]

  def keys(self) -> list[str]:
    return list(self._keys)

  def doc_hashes(self) -> np.ndarray:
    return key_hashes(self._keys)


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

  def __init__(self, files: Sequence[str], text_field: str, tok=None, errors: str = 'strict'):
    self._files = list(files)
    for path in self._files:
      if path.endswith(COMPRESSED):
        raise UserError(f'data.paths: {path} is compressed, which allows no random access; '
                        'tokenise it once with scripts/prepare_data.py and train with '
                        "data.source='array_record'.")
    self._file_keys = relative_keys(self._files)
    self._text_field = text_field
    self._tok, self._errors = tok, errors
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
    text = jsonl_text(line, where, self._text_field, self._errors)
    if self._tok is None or self._tok.spec == 'bytes':
      return tokenizer.encode(text)
    return self._tok.encode(text)

  def key(self, index: int) -> str:
    return f'{self._file_keys[self._file_ids[index]]}:{self._line_numbers[index]}'

  def keys(self) -> list[str]:
    return [f'{self._file_keys[f]}:{n}'
            for f, n in zip(self._file_ids, self._line_numbers, strict=True)]

  def doc_hashes(self) -> np.ndarray:
    return mix_hashes(key_hashes(self._file_keys), self._file_ids, self._line_numbers)


def jsonl_text(line: bytes, where: str, text_field: str, errors: str = 'strict') -> str:
  """The document in one JSON line; every problem is an error naming `where` (file:line)."""
  try:
    record = json.loads(decode_text(line, where, errors))
  except json.JSONDecodeError as e:
    raise UserError(f'{where}: not valid JSON ({e}).') from None
  if not isinstance(record, dict) or text_field not in record:
    raise UserError(f'{where}: no field data.text_field={text_field!r} in this line.')
  text = record[text_field]
  if not isinstance(text, str):
    raise TypeError(f'{where}: field {text_field!r} is {type(text).__name__}, not a string.')
  return text


PREPARED_META = 'prepared.json'  # written by scripts/prepare_data.py beside its shards
LENGTHS_FILE = 'lengths.npy'     # int32 tokens per document, in record order over all shards


class RecordIndex:
  """Global document numbers over per-file record counts, as numpy offsets (no per-document
  Python objects: 10M documents cost a few arrays of 10M numbers)."""

  def __init__(self, file_keys: Sequence[str], counts: Sequence[int]):
    self.file_keys = list(file_keys)
    self.offsets = np.concatenate([[0], np.cumsum(np.asarray(counts, np.int64))])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def locate(self, index: int) -> tuple[int, int]:
    file_id = int(np.searchsorted(self.offsets, index, side='right')) - 1
    return file_id, index - int(self.offsets[file_id])

  def doc_hashes(self) -> np.ndarray:
    counts = np.diff(self.offsets)
    file_ids = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    records = np.arange(len(self), dtype=np.int64) - self.offsets[file_ids]
    return mix_hashes(key_hashes(self.file_keys), file_ids, records)


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)
  return h.hexdigest()


def tokenizer_fingerprint(tok) -> str:
  """What identifies a tokenizer's ids: 'bytes', or the hash of its model file."""
  return 'bytes' if tok.spec == 'bytes' else file_sha256(tok.path)


def check_prepared(files: Sequence[str], tok) -> None:
  """Shards written by prepare_data.py must be read with the tokenizer that wrote them."""
  for d in sorted({os.path.dirname(os.path.abspath(f)) for f in files}):
    meta_path = os.path.join(d, PREPARED_META)
    if not os.path.exists(meta_path):
      continue
    with open(meta_path) as f:
      meta = json.load(f)
    if meta.get('tokenizer_fingerprint') != tokenizer_fingerprint(tok):
      raise UserError(f'{d} was tokenised with {meta.get("tokenizer")!r} but '
                      f'data.tokenizer={tok.spec!r}; set data.tokenizer to the tokenizer '
                      'the shards were prepared with.')


def load_document_lengths(directory: str) -> np.ndarray:
  """Tokens per document of a prepare_data.py output (memory-mapped int32): the real length
  distribution for the hybrid data parallel and disaggregation planners."""
  return np.load(os.path.join(directory, LENGTHS_FILE), mmap_mode='r')


class ArrayRecordSource:
  """One document per ArrayRecord record, stored as int32 little-endian token ids."""

  def __init__(self, files: Sequence[str], vocab_size: int):
    from array_record.python import array_record_data_source  # only this source needs it
    self._files = list(files)
    self._vocab_size = vocab_size
    self._readers = [array_record_data_source.ArrayRecordDataSource([f]) for f in self._files]
    self._index = RecordIndex(relative_keys(self._files), [len(r) for r in self._readers])

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, index: int) -> np.ndarray:
    file_id, record = self._index.locate(index)
    data = self._readers[file_id][record]
    if len(data) % 4:
      raise UserError(f'{self._files[file_id]} record {record}: {len(data)} bytes is not a '
                      'whole number of int32 token ids.')
    tokens = np.frombuffer(data, dtype='<i4').astype(np.int32)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self._vocab_size):
      raise UserError(f'{self._files[file_id]} record {record}: token ids span '
                      f'[{tokens.min()}, {tokens.max()}], outside [0, model.vocab_size='
                      f'{self._vocab_size}).')
    return tokens

  def key(self, index: int) -> str:
    file_id, record = self._index.locate(index)
    return f'{self._index.file_keys[file_id]}:{record}'

  def keys(self) -> list[str]:
    return [self.key(i) for i in range(len(self))]

  def doc_hashes(self) -> np.ndarray:
    return self._index.doc_hashes()


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
    raise UserError(f"split={split!r}; choose 'train' or 'eval'.")
  name = config.data.source
  vocab_size = config.model.vocab_size
  tok = tokenizer.load(config.data.get('tokenizer', 'bytes'))
  tokenizer.check_vocab(tok, vocab_size)
  errors = config.data.get('decode_errors', 'strict')
  if errors not in ('strict', 'replace'):
    raise UserError(f"data.decode_errors={errors!r}; choose 'strict' or 'replace'.")
  # data.eval_paths: a separate eval corpus; then every document of data.paths trains.
  eval_paths = config.data.get('eval_paths', '').strip()
  paths = eval_paths if eval_paths and split == 'eval' else config.data.paths
  if name == 'local_text':
    base = TextFileSource(resolve_paths(paths) if paths.strip() else stdlib_python_files(),
                          tok, errors)
  elif name == 'text':
    base = TextFileSource(resolve_paths(paths), tok, errors)
  elif name == 'jsonl':
    base = JsonlSource(resolve_paths(paths), config.data.text_field, tok, errors)
  elif name == 'array_record':
    files = resolve_paths(paths)
    check_prepared(files, tok)
    base = ArrayRecordSource([f for f in files if f.endswith('.array_record')] or files,
                             vocab_size)
  else:
    raise UserError(f'data.source={name!r} is not a document source; choose one of '
                    f'{DOCUMENT_SOURCES}.')
  if eval_paths:
    return SubsetSource(base, np.arange(len(base)))
  held_out = eval_mask_of_hashes(base.doc_hashes(), config.data.eval_fraction)
  return SubsetSource(base, np.flatnonzero(held_out if split == 'eval' else ~held_out))


# --- streaming readers (scripts/prepare_data.py, scripts/train_tokenizer.py) ---

COMPRESSED = ('.gz', '.zst')
STREAM_SOURCES = ('text', 'jsonl', 'parquet', 'local_text')


def _open_bytes(path: str) -> io.BufferedIOBase:
  if path.endswith('.gz'):
    return gzip.open(path, 'rb')
  if path.endswith('.zst'):
    import zstandard  # optional: only .zst files need it
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, 'rb'),
                                                                        closefd=True))
  return open(path, 'rb')


def iter_texts(path: str, source: str, text_field: str = 'text', errors: str = 'strict',
               raw: bool = False) -> Iterator[str | bytes]:
  """The documents of one file, in order: the whole file (text), one per non-blank line
  (jsonl, also .jsonl.gz / .jsonl.zst) or one per row of column `text_field` (parquet).
  `raw`: text files as undecoded bytes (byte tokens need no decoding, as in training)."""
  if source in ('text', 'local_text'):
    with open(path, 'rb') as f:
      data = f.read()
    if raw:
      if (nul := looks_binary(data)) >= 0:
        raise UserError(f'{path}: looks binary (NUL byte at offset {nul}), not a text '
                        'document; remove it from the paths.')
      yield data
    else:
      yield decode_text(data, path, errors)
  elif source == 'jsonl':
    try:
      with _open_bytes(path) as f:
        for number, line in enumerate(f, 1):
          if line.strip():
            yield jsonl_text(line, f'{path}:{number}', text_field, errors)
    except (OSError, EOFError) as e:  # a corrupt or truncated compressed file
      if isinstance(e, FileNotFoundError):
        raise
      raise UserError(f'{path}: cannot be read as {source} ({e}).') from None
  elif source == 'parquet':
    import pyarrow.parquet as pq  # optional: only parquet needs it
    try:
      pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for a non-parquet file
      raise UserError(f'{path}: not a parquet file ({e}).') from None
    if text_field not in pf.schema_arrow.names:
      raise UserError(f'{path}: no column data.text_field={text_field!r} '
                      f'(columns: {pf.schema_arrow.names}).')
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
      for text in batch.column(0).to_pylist():
        if text is not None:
          yield text
  else:
    raise UserError(f'--source {source!r}; choose one of {STREAM_SOURCES}.')
