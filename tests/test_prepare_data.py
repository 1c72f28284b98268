"""scripts/prepare_data.py: every source format into ArrayRecord shards the training pipeline
reads, a lengths index, resume after an interruption, and a 10M-document index in numpy."""

import gzip
import json
import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

from configs import base
from scripts import prepare_data
from training import data
from training.data import prepare, sources, tokenizer

DOCS = [f'document {i}: ' + 'héllo wörld ' * (i % 7) + '🙂' * (i % 3) for i in range(40)]


def write_inputs(root):
  """The same 40 documents as jsonl.gz, jsonl.zst, parquet and one text file each."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard
  lines = ''.join(json.dumps({'text': d, 'n': i}) + '\n' for i, d in enumerate(DOCS))
  with gzip.open(root / 'a.jsonl.gz', 'wt') as f:
    f.write(lines[:len(lines) // 2].rsplit('\n', 1)[0] + '\n\n')  # first docs, a blank line
  half = sum(1 for line in lines[:len(lines) // 2].rsplit('\n', 1)[0].split('\n'))
  (root / 'b.jsonl.zst').write_bytes(zstandard.ZstdCompressor().compress(
      ''.join(json.dumps({'text': d}) + '\n' for d in DOCS[half:]).encode()))
  pq.write_table(pa.table({'text': DOCS, 'id': list(range(40))}), root / 'c.parquet',
                 row_group_size=16)
  (root / 'txt').mkdir()
  for i, d in enumerate(DOCS):
    (root / 'txt' / f'{i:02d}.txt').write_text(d)


def read_back(out, tok_spec='bytes', vocab_size=256):
  c = base.get_config()
  c.data.update(source='array_record', paths=str(out), tokenizer=tok_spec, eval_fraction=0.0)
  c.model.vocab_size = vocab_size
  src = sources.make_document_source(c, 'train')
  tok = tokenizer.load(tok_spec)
  return [tok.decode(src[i]) for i in range(len(src))], c


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp('inputs')
  write_inputs(root)
  return root


@pytest.mark.parametrize('source,pattern', [('jsonl', 'a.jsonl.gz,b.jsonl.zst'),
                                            ('parquet', 'c.parquet'), ('text', 'txt/*.txt')])
def test_every_source_round_trips(inputs, tmp_path, source, pattern):
  out = tmp_path / 'out'
  paths = ','.join(str(inputs / p) for p in pattern.split(','))
  assert prepare_data.main(['--source', source, '--paths', paths, '--out', str(out),
                            '--workers', '1', '--shards', '3', '--no-progress']) == 0
  docs, c = read_back(out)
  assert docs == DOCS  # every document, in order, exactly
  lengths = sources.load_document_lengths(str(out))
  np.testing.assert_array_equal(lengths, [len(d.encode()) for d in DOCS])
  meta = json.load(open(out / 'prepared.json'))
  assert meta['documents'] == 40 and meta['tokens'] == int(lengths.sum()) == meta['bytes']
  batch = next(data.make_train_iterator(c))  # trains from the shards
  assert batch['inputs'].shape == (c.batch_size, c.seq_len)


def test_parallel_bpe_resume_and_tokenizer_check(inputs, tmp_path):
  from scripts import train_tokenizer
  spec = f'hf:{tmp_path / "tok.json"}'
  assert train_tokenizer.main(['--source', 'text', '--paths', str(inputs / 'txt' / '*.txt'),
                               '--vocab_size', '300', '--out', spec[3:], '--kind', 'hf']) == 0
  out = tmp_path / 'out'
  args = ['--source', 'text', '--paths', str(inputs / 'txt' / '*.txt'), '--tokenizer', spec,
          '--out', str(out), '--shards', '4', '--no-progress']
  assert prepare_data.main(args + ['--workers', '2']) == 0
  docs, c = read_back(out, spec, 300)
  assert docs == DOCS
  first = {f: open(out / f, 'rb').read() for f in os.listdir(out)
           if f.startswith('shard-') and not f.endswith('.done')}
  # An interrupted run: shard 2 was being written (no marker, a partial file). Rerunning
  # prepares only that shard and gives the same bytes.
  os.remove(out / 'shard-00002-of-00004.done')
  os.rename(out / 'shard-00002-of-00004.array_record',
            out / 'shard-00002-of-00004.array_record.tmp')
  files = sorted(str(p) for p in (inputs / 'txt').glob('*.txt'))
  summary = prepare.prepare(prepare.make_plan('text', files, spec, num_shards=4), str(out))
  assert summary['shards_prepared_now'] == 1 and summary['documents'] == 40
  assert {f: open(out / f, 'rb').read() for f in first} == first
  # The shards name their tokenizer: reading them with another is an error.
  c.data.tokenizer = 'bytes'
  with pytest.raises(ValueError, match=r"tokenised with 'hf:.*data.tokenizer='bytes'"):
    sources.make_document_source(c, 'train')
  # Resuming into the same directory with other settings is refused.
  with pytest.raises(ValueError, match='different preparation.*tokenizer_fingerprint'):
    prepare.prepare(prepare.make_plan('text', files, 'bytes', num_shards=4), str(out))


def test_bad_input_files_are_named(tmp_path, capsys):
  (tmp_path / 'good.jsonl').write_text(json.dumps({'text': 'ok'}) + '\n')
  (tmp_path / 'bad.jsonl.gz').write_bytes(b'not gzip at all')
  (tmp_path / 'blob.jsonl').write_bytes(b'{"text": "\xff\xfe"}\n')
  for name, why in (('bad.jsonl.gz', 'cannot be read'), ('blob.jsonl', 'not valid UTF-8')):
    assert prepare_data.main(['--source', 'jsonl', '--paths', str(tmp_path / name), '--out',
                              str(tmp_path / f'o_{name}'), '--workers', '1',
                              '--no-progress']) == 2  # a user error
    err = capsys.readouterr().err
    assert name in err and why in err, err
  (tmp_path / 'x.parquet').write_text('not parquet')
  assert prepare_data.main(['--source', 'parquet', '--paths', str(tmp_path / 'x.parquet'),
                            '--out', str(tmp_path / 'o3'), '--no-progress']) == 2
  assert 'x.parquet: not a parquet file' in capsys.readouterr().err


def test_byte_tokens_are_the_file_bytes(tmp_path):
  """Bytes need no decoding: a Latin-1 file gives its raw bytes, as training's text source."""
  raw = 'café ünï'.encode('latin-1')
  (tmp_path / 'latin1.txt').write_bytes(raw)
  out = tmp_path / 'out'
  assert prepare_data.main(['--source', 'text', '--paths', str(tmp_path / '*.txt'), '--out',
                            str(out), '--workers', '1', '--no-progress']) == 0
  c = base.get_config()
  c.data.update(source='array_record', paths=str(out), eval_fraction=0.0)
  np.testing.assert_array_equal(sources.make_document_source(c, 'train')[0],
                                np.frombuffer(raw, np.uint8))


def test_split_files_balances_contiguous_runs():
  assert prepare.split_files([10] * 6, 3) == [(0, 1), (2, 3), (4, 5)]
  shards = prepare.split_files([10, 10, 10, 10, 100, 5, 5], 3)  # one big file: fewer shards
  assert [i for s in shards for i in s] == list(range(7)) and 1 < len(shards) <= 3
  assert prepare.split_files([1, 2], 8) == [(0,), (1,)]
  assert prepare.split_files([0], 4) == [(0,)]


def test_ten_million_document_index_in_numpy():
  """Split and lookup over 10M documents: a few numpy arrays, no Python object per document."""
  n_files, per_file = 100, 100_000
  tracemalloc.start()
  start = time.process_time()
  index = sources.RecordIndex([f'shard-{i:05d}.array_record' for i in range(n_files)],
                              [per_file] * n_files)
  held_out = sources.eval_mask_of_hashes(index.doc_hashes(), 0.01)
  train = np.flatnonzero(~held_out)
  seconds = time.process_time() - start
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert len(index) == 10_000_000 and abs(held_out.mean() - 0.01) < 0.001
  assert index.locate(5_432_109) == (54, 32_109)
  assert len(train) + held_out.sum() == 10_000_000
  # A Python str key per document alone would take > 50 bytes each.
  assert peak / len(index) < 40, f'{peak / len(index):.1f} bytes per document'
  assert seconds < 20, f'{seconds:.1f}s of CPU'
  # The same document keeps its split when files are added after it.
  more = sources.RecordIndex(index.file_keys + ['zzz.array_record'], [per_file] * (n_files + 1))
  np.testing.assert_array_equal(more.doc_hashes()[:1000], index.doc_hashes()[:1000])


def test_cli_help():
  out = subprocess.run([sys.executable, 'scripts/prepare_data.py', '--help'],
                       capture_output=True, text=True, check=True).stdout
  assert '--tokenizer' in out and 'parquet' in out
