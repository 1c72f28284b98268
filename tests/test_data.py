"""Tests for training/data: packing invariants, exact resume, splits, shards, readers and tasks."""

import json
import os
import re

import grain
import numpy as np
import pytest

from configs import base
from training import data
from training.data import packing, sources, tokenizer

SEQ_LEN = 64
BATCH = 4


def make_config(**data_overrides):
  c = base.get_config()
  c.seq_len = SEQ_LEN
  c.batch_size = BATCH
  c.data.eval_fraction = 0.0
  for k, v in data_overrides.items():
    setattr(c.data, k, v)
  return c


def doc_text(i: int) -> str:
  # Lengths from 0 to several rows so that some documents are cut into pieces and some are empty.
  return ''.join(f'doc{i:03d}.{j} ' for j in range((i * 7) % 41))


@pytest.fixture
def corpus(tmp_path):
  texts = {}
  for i in range(30):
    path = tmp_path / 'txt' / f'{i:03d}.txt'
    path.parent.mkdir(exist_ok=True)
    path.write_text(doc_text(i))
    texts[i] = doc_text(i)
  return tmp_path, texts


def check_row_invariants(row: dict[str, np.ndarray]) -> None:
  seg, pos, inp, tgt = row['segment_ids'], row['positions'], row['inputs'], row['targets']
  used = seg > 0
  n = int(used.sum())
  assert used[:n].all() and not used[n:].any(), 'padding only at the end'
  assert (tgt[n:] == -1).all() and (pos[n:] == 0).all() and (inp[n:] == 0).all()
  if n == 0:
    return
  s = seg[:n]
  assert s[0] == 1 and (np.diff(s) >= 0).all() and (np.diff(s) <= 1).all(), 'contiguous 1,2,3..'
  starts = np.concatenate([[True], np.diff(s) == 1])
  for i in range(n):
    assert pos[i] == (0 if starts[i] else pos[i - 1] + 1)
  same = s[1:] == s[:-1]
  # Inside a piece, each target is the next input (the next token of the same document).
  assert (tgt[:n - 1][same] == inp[1:n][same]).all()
  assert (tgt[:n] >= 0).all(), 'document pieces have a loss at every position'


def row_pieces(row: dict[str, np.ndarray]) -> list[bytes]:
  """Each segment's tokens: its inputs plus the last target (the piece's next token)."""
  out = []
  for s in range(1, int(row['segment_ids'].max(initial=0)) + 1):
    idx = np.flatnonzero(row['segment_ids'] == s)
    out.append(np.append(row['inputs'][idx], row['targets'][idx[-1]]).astype(np.uint8).tobytes())
  return out


def batch_rows(batch):
  return [{k: v[r] for k, v in batch.items()} for r in range(len(batch['inputs']))]


def expected_pieces(text: str, seq_len: int) -> list[bytes]:
  b = text.encode()
  return [b[i:min(i + seq_len, len(b) - 1) + 1] for i in range(0, max(len(b) - 1, 0), seq_len)]


def test_packing_invariants_on_training_batches(corpus):
  root, _ = corpus
  c = make_config(paths=str(root / 'txt' / '*.txt'), num_packing_bins=3)
  it = data.make_train_iterator(c)
  for _ in range(12):
    batch = next(it)
    assert set(batch) == {'inputs', 'targets', 'segment_ids', 'positions', 'target_bytes'}
    np.testing.assert_array_equal(batch['target_bytes'], batch['targets'] >= 0)  # 1 byte each
    for k, v in batch.items():
      assert v.shape == (BATCH, SEQ_LEN) and v.dtype == np.int32, k
    for row in batch_rows(batch):
      check_row_invariants(row)


def test_pieces_reassemble_every_document(corpus):
  root, texts = corpus
  c = make_config(paths=str(root / 'txt' / '*.txt'))
  docs = grain.MapDataset.source(sources.make_document_source(c, 'train')).to_iter_dataset()
  rows = list(packing.pack_documents(docs, seq_len=SEQ_LEN, num_packing_bins=4, seed=0))
  got = sorted(p for row in rows for p in row_pieces(row))
  want = sorted(p for t in texts.values() for p in expected_pieces(t, SEQ_LEN))
  assert got == want
  # A document longer than a row is split, not truncated.
  assert max(len(t) for t in texts.values()) > 3 * SEQ_LEN
  assert sum(len(p) - 1 for p in got) == sum(max(len(t) - 1, 0) for t in texts.values())


def test_split_document_pieces():
  pieces = packing.SplitDocument(4).flat_map(np.arange(10, dtype=np.int32))
  assert [p['inputs'].tolist() for p in pieces] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
  assert [p['targets'].tolist() for p in pieces] == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
  assert packing.SplitDocument(4).flat_map(np.array([7], np.int32)) == []


@pytest.mark.parametrize('source', ['local_text', 'synthetic'])
def test_iterator_resumes_exactly(corpus, source):
  root, _ = corpus
  c = make_config(paths=str(root / 'txt' / '*.txt'), source=source)
  it = data.make_train_iterator(c)
  for _ in range(5):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(6)]
  fresh = data.make_train_iterator(c)
  fresh.set_state(state)
  got = [next(fresh) for _ in range(6)]
  for w, g in zip(want, got, strict=True):
    for k in w:
      np.testing.assert_array_equal(w[k], g[k])


def test_iterator_resumes_through_orbax(corpus, tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  root, _ = corpus
  c = make_config(paths=str(root / 'txt' / '*.txt'))
  it = data.make_train_iterator(c)
  next(it)
  ckpt = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  ckpt.save(tmp_path / 'ck', args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  want = next(it)
  fresh = data.make_train_iterator(c)
  ckpt.restore(tmp_path / 'ck', args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(fresh)))
  np.testing.assert_array_equal(next(fresh)['inputs'], want['inputs'])


def first_inputs(c) -> np.ndarray:
  return next(data.make_train_iterator(c))['inputs']


def test_shuffle_changes_order_and_is_seeded(corpus):
  root, _ = corpus
  c = make_config(paths=str(root / 'txt' / '*.txt'))
  np.testing.assert_array_equal(first_inputs(c), first_inputs(c))
  c2 = make_config(paths=str(root / 'txt' / '*.txt'))
  c2.seed = 1
  assert not np.array_equal(first_inputs(c), first_inputs(c2))


def test_eval_and_train_documents_are_disjoint(corpus):
  root, _ = corpus
  c = make_config(paths=str(root / 'txt' / '*.txt'), eval_fraction=0.3)
  train = set(sources.make_document_source(c, 'train').keys())
  held_out = set(sources.make_document_source(c, 'eval').keys())
  assert train and held_out and not train & held_out
  assert train | held_out == {f'{i:03d}.txt' for i in range(30)}
  # Keys (hence the split) do not depend on where the data directory is mounted.
  assert sources.relative_keys(['/x/a/1.txt', '/x/b/2.txt']) == \
      sources.relative_keys(['/mnt/y/a/1.txt', '/mnt/y/b/2.txt']) == ['a/1.txt', 'b/2.txt']
  keys = [f'doc{i}' for i in range(2000)]
  assert abs(sources.eval_mask(keys, 0.1).mean() - 0.1) < 0.03


def test_eval_batches_are_deterministic_and_held_out(corpus):
  root, _ = corpus
  c = make_config(paths=str(root / 'txt' / '*.txt'), eval_fraction=0.3)
  a = data.make_eval_batches(c, num_batches=3)
  b = data.make_eval_batches(c, num_batches=3)
  assert len(a) == 3
  for x, y in zip(a, b, strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  held_out = {int(key[:3]) for key in sources.make_document_source(c, 'eval').keys()}  # noqa: SIM118
  seen = {int(m) for batch in a for row in batch_rows(batch) for p in row_pieces(row)
          for m in re.findall(rb'doc(\d{3})', p)}
  assert seen and seen <= held_out


def test_process_shards_are_disjoint_and_cover_everything(tmp_path):
  # Short, distinct documents (one piece each) so each row segment names its document.
  for i in range(24):
    (tmp_path / f'{i:02d}.txt').write_text(f'<{i:02d}>' * (1 + i % 5))
  c = make_config(paths=str(tmp_path / '*.txt'))
  c.batch_size = 2 * BATCH
  # Shuffling is global (one order per epoch for any process count), so with it on a
  # process's documents change between epochs; unshuffled, process p keeps positions p::2.
  c.data.shuffle = False
  seen = []
  for p in range(2):
    it = data.make_train_iterator(c, process_index=p, process_count=2)
    ids = set()
    for _ in range(6):
      batch = next(it)
      assert batch['inputs'].shape == (BATCH, SEQ_LEN)
      ids |= {int(m) for row in batch_rows(batch) for piece in row_pieces(row)
              for m in re.findall(rb'<(\d\d)>', piece)}
    seen.append(ids)
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(24))


def test_text_reader_reads_bytes(tmp_path):
  (tmp_path / 'a.txt').write_text('héllo wörld')
  src = sources.make_document_source(make_config(source='text', paths=str(tmp_path / '*.txt')),
                                     'train')
  assert len(src) == 1 and tokenizer.decode(src[0]) == 'héllo wörld'
  assert src[0].dtype == np.int32 and src[0].max() < 256


def test_jsonl_reader(tmp_path):
  path = tmp_path / 'd.jsonl'
  lines = [json.dumps({'text': 'first doc', 'id': 1}), '', json.dumps({'body': 'x', 'text': 'ü'}),
           json.dumps({'text': 'last'})]
  path.write_text('\n'.join(lines))  # no trailing newline, and a blank line
  c = make_config(source='jsonl', paths=str(path))
  src = sources.make_document_source(c, 'train')
  assert [tokenizer.decode(src[i]) for i in range(len(src))] == ['first doc', 'ü', 'last']
  assert src.keys() == ['d.jsonl:1', 'd.jsonl:3', 'd.jsonl:4']
  bad = tmp_path / 'bad.jsonl'
  bad.write_text(json.dumps({'text': 'ok'}) + '\n' + json.dumps({'content': 'no text'}) + '\n')
  src = sources.make_document_source(make_config(source='jsonl', paths=str(bad)), 'train')
  with pytest.raises(ValueError, match=r'bad\.jsonl:2.*data\.text_field'):
    src[1]


def test_array_record_reader(tmp_path):
  from array_record.python import array_record_module
  docs = [np.arange(n, dtype=np.int32) * 3 % 256 for n in (5, 150, 1, 70)]
  path = str(tmp_path / 'tokens.array_record')
  writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
  for d in docs:
    writer.write(d.astype('<i4').tobytes())
  writer.close()
  c = make_config(source='array_record', paths=path)
  src = sources.make_document_source(c, 'train')
  assert len(src) == len(docs)
  for i, d in enumerate(docs):
    np.testing.assert_array_equal(src[i], d)
  batch = next(data.make_train_iterator(c))
  for row in batch_rows(batch):
    check_row_invariants(row)
  c.model.vocab_size = 100
  with pytest.raises(ValueError, match='model.vocab_size=100'):
    sources.make_document_source(c, 'train')[1]


def test_synthetic_shapes_range_and_determinism():
  c = make_config(source='synthetic')
  c.model.vocab_size = 50
  batch = next(data.make_train_iterator(c))
  assert batch['inputs'].shape == (BATCH, SEQ_LEN) and batch['inputs'].dtype == np.int32
  assert batch['inputs'].min() >= 0 and batch['inputs'].max() < 50
  assert (batch['segment_ids'] == 1).all()
  np.testing.assert_array_equal(batch['positions'], np.broadcast_to(np.arange(SEQ_LEN), (4, 64)))
  np.testing.assert_array_equal(batch['targets'][:, :-1], batch['inputs'][:, 1:])
  np.testing.assert_array_equal(batch['inputs'], next(data.make_train_iterator(c))['inputs'])
  assert not np.array_equal(batch['inputs'], data.make_eval_batches(c, num_batches=1)[0]['inputs'])
  assert len({r.tobytes() for r in batch['inputs']}) == BATCH


def test_passkey_targets_only_on_answer():
  c = make_config(source='passkey')
  c.seq_len = 512
  c.data.task_length = 400
  batch = next(data.make_train_iterator(c))
  depths = set()
  for row in batch_rows(batch):
    assert (row['segment_ids'][:400] == 1).all() and (row['segment_ids'][400:] == 0).all()
    scored = np.flatnonzero(row['targets'] >= 0)
    np.testing.assert_array_equal(scored, np.arange(395, 400))
    answer = tokenizer.decode(row['targets'][scored])
    text = tokenizer.decode(row['inputs'][:400])
    needle = re.search(r'The pass key is (\d{5})\. Remember it', text)
    assert needle and needle.group(1) == answer
    assert text.endswith('What is the pass key? The pass key is ' + answer[:4])
    depths.add(needle.start())
  assert len(depths) > 1, 'the needle depth varies'
  with pytest.raises(ValueError, match='data.task_length'):
    c.data.task_length = 50
    next(data.make_train_iterator(c))


def test_mqar_targets_only_on_queried_values():
  c = make_config(source='mqar', mqar_num_pairs=8)
  batch = next(data.make_train_iterator(c))
  for row in batch_rows(batch):
    inp, tgt = row['inputs'], row['targets']
    table = dict(zip(inp[0:16:2].tolist(), inp[1:16:2].tolist(), strict=True))
    assert len(table) == 8
    scored = np.flatnonzero(tgt >= 0)
    assert len(scored) == 8 and scored.min() >= 16
    assert sorted(inp[scored].tolist()) == sorted(table)
    for i in scored:
      assert tgt[i] == table[inp[i]]


def test_stdlib_default_corpus():
  c = base.get_config()
  c.seq_len = 128
  c.batch_size = 2
  files = sources.stdlib_python_files()
  assert len(files) > 100 and not any('site-packages' in f for f in files)
  batch = next(data.make_train_iterator(c))
  assert batch['inputs'].shape == (2, 128)
  for row in batch_rows(batch):
    check_row_invariants(row)
  train = sources.make_document_source(c, 'train')
  held_out = sources.make_document_source(c, 'eval')
  assert len(train) + len(held_out) == len(files) and len(held_out) > 0
  assert not set(train.keys()) & set(held_out.keys())


def test_bad_configs(tmp_path):
  with pytest.raises(ValueError, match=r"data\.source='nope'.*local_text.*mqar"):
    data.make_train_iterator(make_config(source='nope'))
  with pytest.raises(ValueError, match='data.paths'):
    data.make_train_iterator(make_config(source='text', paths=str(tmp_path / '*.txt')))
  with pytest.raises(ValueError, match='data.paths'):
    data.make_train_iterator(make_config(source='jsonl', paths=''))
  c = make_config()
  c.model.vocab_size = 128
  with pytest.raises(ValueError, match='model.vocab_size=128'):
    data.make_train_iterator(c)
  with pytest.raises(ValueError, match='batch_size=4'):
    data.local_batch_size(make_config(), 3)
  assert data.local_batch_size(make_config(), 2) == 2
  with pytest.raises(ValueError, match='data.eval_fraction'):
    data.make_eval_batches(make_config(paths=os.path.abspath(__file__)), num_batches=1)


def test_worker_processes_match_in_process(corpus):
  root, _ = corpus
  c = make_config(paths=str(root / 'txt' / '*.txt'))
  want = [next(data.make_train_iterator(c))]
  c.data.worker_count = 1
  it = data.make_train_iterator(c)
  got = [next(it)]
  it.close()  # stop the worker now rather than at interpreter exit
  np.testing.assert_array_equal(got[0]['inputs'], want[0]['inputs'])
  np.testing.assert_array_equal(got[0]['targets'], want[0]['targets'])
