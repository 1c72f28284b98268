"""Tokenizers behind one small interface, chosen by `data.tokenizer`.

    bytes               one token per UTF-8 byte (0..255), no vocabulary file (the default;
                        as in ByT5, Xue et al., 2022)
    sentencepiece:PATH  a SentencePiece model file (Kudo & Richardson, 2018)
    hf:PATH             a Hugging Face `tokenizers` tokenizer.json (or a directory holding one)

Every tokenizer also says how many UTF-8 bytes of text each token id stands for
(`token_bytes`), so losses can be reported in bits per byte, which compares across tokenizers.
"""

import functools
import json
import os
from typing import Protocol

import numpy as np

from checkpoint.errors import UserError

BYTE_VOCAB_SIZE = 256
KINDS = ('bytes', 'sentencepiece:PATH', 'hf:PATH')


class Tokenizer(Protocol):
  spec: str         # the data.tokenizer value it was loaded from
  vocab_size: int   # ids are in [0, vocab_size)

  def encode(self, text: str) -> np.ndarray: ...            # int32 ids, no special tokens
  def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...
  def decode(self, ids) -> str: ...
  def token_bytes(self) -> np.ndarray: ...                   # [vocab_size] int32


# --- bytes (module-level functions kept: the byte sources and tasks call them directly) ---

def encode(data: str | bytes) -> np.ndarray:
  """Returns the int32 byte ids of `data` (str is encoded as UTF-8)."""
  if isinstance(data, str):
    data = data.encode('utf-8')
  return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


def decode(tokens: np.ndarray, errors: str = 'replace') -> str:
  """Inverse of `encode` for ids in 0..255; ids outside that range (e.g. -1 targets) are dropped."""
  tokens = np.asarray(tokens)
  tokens = tokens[(tokens >= 0) & (tokens < BYTE_VOCAB_SIZE)]
  return tokens.astype(np.uint8).tobytes().decode('utf-8', errors=errors)


def check_byte_vocab(vocab_size: int, source: str) -> None:
  """Raises if the model's vocabulary cannot hold every byte."""
  if vocab_size < BYTE_VOCAB_SIZE:
    raise UserError(
        f'data.source={source!r} uses byte-level tokens (ids 0..255) but '
        f'model.vocab_size={vocab_size} < {BYTE_VOCAB_SIZE}; set model.vocab_size >= 256.')


class ByteTokenizer:
  spec = 'bytes'
  vocab_size = BYTE_VOCAB_SIZE

  def encode(self, text: str) -> np.ndarray:
    return encode(text)

  def encode_batch(self, texts: list[str | bytes]) -> list[np.ndarray]:
    return [encode(t) for t in texts]

  def decode(self, ids) -> str:
    return decode(ids)

  def token_bytes(self) -> np.ndarray:
    return np.ones(BYTE_VOCAB_SIZE, np.int32)


class SentencePieceTokenizer:
  """A SentencePiece model; control and unknown ids count 0 bytes, byte-fallback ids 1."""

  def __init__(self, path: str, spec: str):
    import sentencepiece  # optional: only this tokenizer needs it
    self.spec, self.path = spec, path
    self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
    self.vocab_size = int(self._sp.get_piece_size())

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, np.int32) for ids in self._sp.encode(texts)]

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    return self._sp.decode([int(i) for i in ids[(ids >= 0) & (ids < self.vocab_size)]])

  def token_bytes(self) -> np.ndarray:
    out = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if self._sp.is_control(i) or self._sp.is_unknown(i):
        continue
      # '▁' is SentencePiece's visible space: one byte of text.
      out[i] = 1 if self._sp.is_byte(i) else len(self._sp.id_to_piece(i).replace('▁', ' ')
                                                 .encode('utf-8'))
    return out


class HFTokenizer:
  """A `tokenizers` tokenizer.json. Special tokens count 0 bytes; with a byte-level model each
  character of a token's string is one byte, otherwise a token counts the UTF-8 bytes it decodes
  to on its own."""

  def __init__(self, path: str, spec: str):
    import tokenizers  # optional: only this tokenizer needs it
    if os.path.isdir(path):
      path = os.path.join(path, 'tokenizer.json')
    self.spec, self.path = spec, path
    self._tok = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.int32)
            for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    return self._tok.decode([int(i) for i in ids[(ids >= 0) & (ids < self.vocab_size)]])

  def token_bytes(self) -> np.ndarray:
    out = np.zeros(self.vocab_size, np.int32)
    decoder = (json.loads(self._tok.to_str()).get('decoder') or {}).get('type')
    special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
    for token, i in self._tok.get_vocab(with_added_tokens=True).items():
      if token in special:
        continue
      out[i] = len(token) if decoder == 'ByteLevel' else len(self._tok.decode([i]).encode())
    return out


@functools.lru_cache(maxsize=8)
def load(spec: str) -> Tokenizer:
  """The tokenizer named by a `data.tokenizer` value (loaded once per process)."""
  kind, _, path = spec.partition(':')
  if kind == 'bytes' and not path:
    return ByteTokenizer()
  if kind in ('sentencepiece', 'hf') and path:
    path = os.path.expanduser(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f'data.tokenizer={spec!r}: {path} does not exist '
                              '(train one with scripts/train_tokenizer.py).')
    return SentencePieceTokenizer(path, spec) if kind == 'sentencepiece' else \
        HFTokenizer(path, spec)
  raise UserError(f'data.tokenizer={spec!r}; choose one of {KINDS}.')


def check_vocab(tok: Tokenizer, vocab_size: int) -> None:
  """The model must have a row for every id the tokenizer emits (more rows are allowed:
  vocabularies are often padded to a multiple of 128)."""
  if vocab_size < tok.vocab_size:
    raise UserError(f'model.vocab_size={vocab_size} is smaller than the vocabulary of '
                    f'data.tokenizer={tok.spec!r} ({tok.vocab_size} ids); set '
                    f'model.vocab_size >= {tok.vocab_size}.')


def target_bytes(table: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """Bytes of text each target stands for (0 where there is no target)."""
  return np.where(targets >= 0, table[np.maximum(targets, 0)], 0).astype(np.int32)
