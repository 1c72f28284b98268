"""Tokenizers behind data.tokenizer: training them offline, lossless round trips, bytes per
token, the vocabulary check, bad files named, and bits/byte in the training metrics."""

import math
import subprocess
import sys

import numpy as np
import pytest

from configs import base
from scripts import train_tokenizer
from training import data
from training.data import sources, tokenizer

TEXTS = [f'def f{i}(x):\n    return x * {i}  # héllo wörld {"🙂" * (i % 3)}\n' * (1 + i % 4)
         for i in range(60)]


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('tok')
  for i, t in enumerate(TEXTS):
    (root / f'{i:02d}.txt').write_text(t)
  return root


@pytest.fixture(scope='module')
def trained(corpus):
  """{'sentencepiece': spec, 'hf': spec}, trained by the script on the corpus."""
  specs = {}
  for kind, name, vocab in (('sentencepiece', 'sp.model', 320), ('hf', 'tokenizer.json', 300)):
    out = corpus / 'out' / name
    assert train_tokenizer.main(['--paths', str(corpus / '*.txt'), '--vocab_size', str(vocab),
                                 '--out', str(out), '--kind', kind]) == 0
    specs[kind] = f'{kind}:{out}'
  return specs


@pytest.mark.parametrize('kind', ['bytes', 'sentencepiece', 'hf'])
def test_round_trip_and_bytes_per_token(trained, kind):
  tok = tokenizer.load(trained.get(kind, 'bytes'))
  table = tok.token_bytes()
  assert table.shape == (tok.vocab_size,)
  for text in TEXTS[:10] + ['unseen ünïcödé\ttext\n\n  ∑ 中文 🙂']:
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    # Bytes per token add up to the text's UTF-8 length: bits/byte is exact.
    assert table[ids].sum() == len(text.encode())
  if kind != 'bytes':
    assert len(tok.encode(TEXTS[5])) < len(TEXTS[5].encode()) / 2, 'merges learnt'
  batch = tok.encode_batch(TEXTS[:3])
  for ids, text in zip(batch, TEXTS[:3]):
    np.testing.assert_array_equal(ids, tok.encode(text))


def test_vocab_check_and_bad_specs(trained, corpus):
  c = base.get_config()
  c.data.update(source='text', paths=str(corpus / '*.txt'), tokenizer=trained['sentencepiece'])
  with pytest.raises(ValueError, match=r"model.vocab_size=256 .*data.tokenizer='sentencepiece:"):
    sources.make_document_source(c, 'train')
  with pytest.raises(ValueError, match=r"data.tokenizer='wordpiece:x'; choose"):
    tokenizer.load('wordpiece:x')
  with pytest.raises(FileNotFoundError, match='data.tokenizer.*train_tokenizer'):
    tokenizer.load('hf:/nonexistent/tokenizer.json')
  c.data.source = 'passkey'
  with pytest.raises(ValueError, match='data.tokenizer=.*document sources only'):
    data.make_train_iterator(c)
  assert train_tokenizer.main(['--paths', str(corpus / '*.txt'), '--vocab_size', '10',
                               '--out', str(corpus / 'small.model')]) == 2  # a user error


def test_bad_files_are_named(tmp_path):
  (tmp_path / 'ok.txt').write_text('fine')
  (tmp_path / 'blob.txt').write_bytes(b'\x7fELF\x00\x01\x02')
  (tmp_path / 'latin1.txt').write_bytes('caf\xe9'.encode('latin-1'))
  (tmp_path / 'bad.jsonl').write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
  src = sources.TextFileSource([str(tmp_path / 'blob.txt')])
  with pytest.raises(ValueError, match=r'blob\.txt: looks binary'):
    src[0]
  for source, name in (('text', 'latin1.txt'), ('jsonl', 'bad.jsonl')):
    with pytest.raises(ValueError, match=rf'{name}(:2)?: not valid UTF-8'):
      list(sources.iter_texts(str(tmp_path / name), source))
  assert list(sources.iter_texts(str(tmp_path / 'latin1.txt'), 'text', errors='replace')) == \
      ['caf\ufffd']
  hf = tokenizer.load('bytes')
  with pytest.raises(ValueError, match=r'bad\.jsonl:2: not valid UTF-8'):
    sources.JsonlSource([str(tmp_path / 'bad.jsonl')], 'text', hf)[1]


def test_pipeline_carries_target_bytes(trained, corpus):
  c = base.get_config()
  c.seq_len, c.batch_size = 64, 4
  c.data.update(source='text', paths=str(corpus / '*.txt'), tokenizer=trained['hf'],
                eval_fraction=0.2)
  c.model.vocab_size = 384  # padded above the tokenizer's 300 ids: allowed
  batch = next(data.make_train_iterator(c))
  table = tokenizer.load(trained['hf']).token_bytes()
  valid = batch['targets'] >= 0
  assert batch['inputs'].max() < 300
  np.testing.assert_array_equal(batch['target_bytes'][valid], table[batch['targets'][valid]])
  assert (batch['target_bytes'][~valid] == 0).all()
  evals = data.make_eval_batches(c, num_batches=2)
  per_byte = data.tokens_per_byte(evals)
  assert 0.1 < per_byte < 0.9, 'BPE: fewer tokens than bytes'
  assert data.eval_row(2.0, per_byte) == {'eval/loss': 2.0,
                                          'eval/bits_per_byte': 2.0 * per_byte / math.log(2)}


def test_train_step_reports_bits_per_byte(trained, corpus):
  import jax
  from tests.helpers import Trainer, tiny_config
  c = tiny_config(**{'data.source': 'text', 'data.paths': str(corpus / '*.txt'),
                     'data.tokenizer': trained['sentencepiece'], 'model.vocab_size': 320,
                     'model.num_layers': 1, 'batch_size': 2})
  batch = next(data.make_train_iterator(c))
  t = Trainer(c, devices=jax.devices()[:1])
  _, m = t.program.train_step(t.state, t.program.global_batch(batch))
  nbytes, tokens = batch['target_bytes'].sum(), (batch['targets'] >= 0).sum()
  assert nbytes > 2 * tokens, 'SentencePiece tokens are several bytes each'
  np.testing.assert_allclose(float(m['train/bits_per_byte']),
                             float(m['loss']) * tokens / nbytes / math.log(2), rtol=1e-5)


def test_cli_help():
  out = subprocess.run([sys.executable, 'scripts/train_tokenizer.py', '--help'],
                       capture_output=True, text=True, check=True).stdout
  assert '--vocab_size' in out and 'sentencepiece' in out
