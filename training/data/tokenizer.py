"""Byte-level tokenizer: a token is one UTF-8 byte (0..255), so no vocabulary file is needed.

As in "ByT5: Towards a token-free future with pre-trained byte-to-byte models" (Xue et al., 2022).
"""

import numpy as np

BYTE_VOCAB_SIZE = 256


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
    raise ValueError(
        f'data.source={source!r} uses byte-level tokens (ids 0..255) but '
        f'model.vocab_size={vocab_size} < {BYTE_VOCAB_SIZE}; set model.vocab_size >= 256.')
