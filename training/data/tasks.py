"""Index-addressed example generators: uniform random tokens (benchmarks) and long-context probes.

passkey follows "Landmark Attention: Random-Access Infinite Context Length for Transformers"
(Mohtashami & Jaggi, 2023); mqar follows "Zoology: Measuring and Improving Recall in Efficient
Language Models" (Arora et al., 2023). Every example is a pure function of (seed, split, index).
"""

import numpy as np

from checkpoint.errors import UserError
from training.data import tokenizer

# Effectively infinite: grain slices it per process and never needs to repeat it.
NUM_EXAMPLES = 2**62
_SPLIT_IDS = {'train': 0, 'eval': 1}  # eval draws from a different random stream

_PASSKEY_PREFIX = ('There is an important info hidden inside a lot of irrelevant text. '
                   'Find it and memorize it. I will quiz you about the important info there. ')
_PASSKEY_FILLER = ('The grass is green. ', 'The sky is blue. ', 'The sun is yellow. ',
                   'Here we go. ', 'There and back again. ')
_PASSKEY_NEEDLE = 'The pass key is {key}. Remember it. {key} is the pass key. '
_PASSKEY_QUESTION = 'What is the pass key? The pass key is '
PASSKEY_DIGITS = 5


def make_row(stream: np.ndarray, loss_mask: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """One unpacked row from a token stream of n+1 tokens: inputs stream[:-1], targets stream[1:].

  Targets are -1 where `loss_mask` (length n) is False; positions past n are padding (segment 0).
  """
  n = len(stream) - 1
  inputs = np.zeros(seq_len, np.int32)
  targets = np.full(seq_len, -1, np.int32)
  segment_ids = np.zeros(seq_len, np.int32)
  positions = np.zeros(seq_len, np.int32)
  inputs[:n] = stream[:-1]
  targets[:n] = np.where(loss_mask, stream[1:], -1)
  segment_ids[:n] = 1
  positions[:n] = np.arange(n)
  return {'inputs': inputs, 'targets': targets, 'segment_ids': segment_ids,
          'positions': positions}


class _IndexedTask:
  """Shared plumbing: a random-access source of NUM_EXAMPLES rows, seeded per index."""

  def __init__(self, seed: int, split: str, length: int, seq_len: int):
    if not 0 < length <= seq_len:
      raise UserError(f'data.task_length={length} must be in (0, seq_len={seq_len}] '
                      '(0 means seq_len).')
    self._seed = seed
    self._split_id = _SPLIT_IDS[split]
    self._length = length
    self._seq_len = seq_len

  def __len__(self) -> int:
    return NUM_EXAMPLES

  def _rng(self, index: int) -> np.random.Generator:
    return np.random.default_rng([self._seed, self._split_id, index])


class SyntheticSource(_IndexedTask):
  """Uniform random tokens in [0, vocab_size): one full-length document per row."""

  def __init__(self, seed: int, split: str, seq_len: int, vocab_size: int):
    super().__init__(seed, split, seq_len, seq_len)
    self._vocab_size = vocab_size
    self._segment_ids = np.ones(seq_len, np.int32)
    self._positions = np.arange(seq_len, dtype=np.int32)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    # Philox is counter-based: seeding it per index is cheaper than a SeedSequence.
    bitgen = np.random.Philox(key=self._seed, counter=[index, self._split_id, 0, 0])
    stream = np.random.Generator(bitgen).integers(
        0, self._vocab_size, self._seq_len + 1, dtype=np.int32)
    return {'inputs': stream[:-1], 'targets': stream[1:],
            'segment_ids': self._segment_ids.copy(), 'positions': self._positions.copy()}


class PasskeySource(_IndexedTask):
  """Filler text with 'The pass key is NNNNN' at a random depth; loss only on the answer digits."""

  def __init__(self, seed: int, split: str, length: int, seq_len: int):
    super().__init__(seed, split, length, seq_len)
    fixed = (len(_PASSKEY_PREFIX) + len(_PASSKEY_NEEDLE.format(key='0' * PASSKEY_DIGITS))
             + len(_PASSKEY_QUESTION) + PASSKEY_DIGITS)
    self._filler_len = length + 1 - fixed
    if self._filler_len < 0:
      raise UserError(f'data.task_length={length} is too short for passkey: it needs at least '
                      f'{fixed - 1} tokens.')

  def example(self, index: int) -> tuple[dict[str, np.ndarray], str, float]:
    """The row, its passkey, and the needle depth as a fraction of the filler."""
    rng = self._rng(index)
    key = str(rng.integers(10**(PASSKEY_DIGITS - 1), 10**PASSKEY_DIGITS))
    # Whole filler sentences (cycling), then spaces to hit the exact length.
    sentences, used = [], 0
    while True:
      s = _PASSKEY_FILLER[len(sentences) % len(_PASSKEY_FILLER)]
      if used + len(s) > self._filler_len:
        break
      sentences.append(s)
      used += len(s)
    split = int(rng.integers(0, len(sentences) + 1))  # the needle goes between sentences
    text = (_PASSKEY_PREFIX + ''.join(sentences[:split]) + _PASSKEY_NEEDLE.format(key=key)
            + ''.join(sentences[split:]) + ' ' * (self._filler_len - used)
            + _PASSKEY_QUESTION + key)
    stream = tokenizer.encode(text)
    loss_mask = np.zeros(self._length, bool)
    loss_mask[-PASSKEY_DIGITS:] = True  # the last positions predict the answer digits
    depth = split / max(len(sentences), 1)
    return make_row(stream, loss_mask, self._seq_len), key, depth

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self.example(index)[0]


class MqarSource(_IndexedTask):
  """Multi-query associative recall: key-value pairs, then each key queried once at a random slot.

  Token 0 is filler; keys come from [1, 1+K) and values from [1+K, vocab_size), K=(vocab_size-1)//2.
  The loss is only on the value after each query key.
  """

  def __init__(self, seed: int, split: str, length: int, seq_len: int, vocab_size: int,
               num_pairs: int):
    super().__init__(seed, split, length, seq_len)
    self._num_keys = (vocab_size - 1) // 2
    self._value_lo = 1 + self._num_keys
    self._vocab_size = vocab_size
    self._num_pairs = num_pairs
    if not 0 < num_pairs <= self._num_keys or self._value_lo >= vocab_size:
      raise UserError(f'data.mqar_num_pairs={num_pairs} needs 0 < pairs <= '
                      f'(model.vocab_size - 1) // 2 = {self._num_keys} distinct keys.')
    self._num_slots = (length + 1 - 2 * num_pairs) // 2
    if self._num_slots < num_pairs:
      raise UserError(f'data.task_length={length} is too short for mqar with '
                      f'data.mqar_num_pairs={num_pairs}: it needs at least {4 * num_pairs - 1}.')

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = self._rng(index)
    n, pairs = self._length, self._num_pairs
    keys = rng.choice(self._num_keys, pairs, replace=False) + 1
    values = rng.integers(self._value_lo, self._vocab_size, pairs)
    stream = np.zeros(n + 1, np.int32)
    stream[0:2 * pairs:2] = keys
    stream[1:2 * pairs:2] = values
    order = rng.permutation(pairs)
    query_at = 2 * pairs + 2 * np.sort(rng.choice(self._num_slots, pairs, replace=False))
    stream[query_at] = keys[order]
    stream[query_at + 1] = values[order]
    loss_mask = np.zeros(n, bool)
    loss_mask[query_at] = True  # input = query key, target = its value
    return make_row(stream, loss_mask, self._seq_len)


TASK_SOURCES = ('synthetic', 'passkey', 'mqar')


def make_task_source(config, split: str):
  """The row source of a generated `config.data.source` (synthetic, passkey or mqar)."""
  name, seq_len, vocab_size = config.data.source, config.seq_len, config.model.vocab_size
  length = config.data.task_length or seq_len
  seed = config.seed
  if name == 'synthetic':
    return SyntheticSource(seed, split, seq_len, vocab_size)
  if name == 'passkey':
    tokenizer.check_byte_vocab(vocab_size, name)
    return PasskeySource(seed, split, length, seq_len)
  if name == 'mqar':
    return MqarSource(seed, split, length, seq_len, vocab_size, config.data.mqar_num_pairs)
  raise UserError(f'data.source={name!r} is not a generated task; choose one of {TASK_SOURCES}.')
