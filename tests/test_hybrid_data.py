"""The hybrid-data-parallel document stream (training/hybrid/data.py) on a tiny long-tail corpus:
documents longer than seq_len but within parallelism.hybrid_dp.max_doc_len reach the batches
whole, longer ones come as pieces of max_doc_len that train every next-token target exactly
once, bad settings fail naming the key, and the stream resumes exactly (iterator state, and
through train.py's loop and checkpoints, where eval/loss still runs on seq_len rows)."""

import json
import logging

import numpy as np
import pytest

from configs import base
from parallelism import mesh as mesh_lib
from tests.helpers import tiny_config
from training import loop
from training.hybrid import data as hybrid_data
from training.metrics import throughput
from training.data import sources

C, SEQ_LEN = 16, 12                # capacity; eval rows (shorter than many documents)
LAYOUTS = (1, 2)                   # max_doc_len 0 -> 2 x 16 = 32 tokens
# Bytes per document: short ones, some in (seq_len, 32] and some past 32 (cut), two of one
# token (nothing to predict) and an empty one.
LENGTHS = [3, 7, 12, 13, 20, 31, 32, 33, 47, 64, 65, 100, 1, 0, 9, 5, 1, 28]
BATCH = 4


def _config(corpus_dir, **overrides):
  c = base.get_config()
  c.data.source, c.data.paths = 'text', str(corpus_dir / '*.txt')
  c.data.eval_fraction, c.data.shuffle = 0.0, False
  c.seq_len, c.batch_size = SEQ_LEN, BATCH
  h = c.parallelism.hybrid_dp
  h.enabled, h.capacity, h.layouts = True, C, LAYOUTS
  for key, value in overrides.items():
    node, (*path, last) = c, key.split('.')
    for p in path:
      node = node[p]
    node[last] = value
  return c


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp('corpus')
  r = np.random.RandomState(0)
  for i, n in enumerate(LENGTHS):
    (d / f'{i:02d}.txt').write_bytes(bytes(r.randint(ord('a'), ord('z') + 1, n).tolist()))
  return d


def _documents(config):
  src = sources.make_document_source(config, 'train')
  return [np.asarray(src[i]) for i in range(len(src))]


def _epoch(config, docs):
  """The stream's items for one pass over the corpus (no shuffle), batched as yielded."""
  limit = hybrid_data.max_doc_len(config.parallelism.hybrid_dp)
  n_items = sum(-(-(len(d) - 1) // (limit - 1)) for d in docs if len(d) > 1)
  it = hybrid_data.make_train_iterator(config)
  items, batches = [], 0
  while len(items) < n_items:
    batch = next(it)
    assert isinstance(batch, list) and len(batch) == BATCH
    assert all(b.dtype == np.int32 for b in batch)
    items.extend(batch)
    batches += 1
  return items[:n_items]


@pytest.mark.parametrize('max_doc_len', [0, 20])
def test_documents_whole_up_to_max_doc_len_and_cut_past_it(corpus, max_doc_len):
  c = _config(corpus, **{'parallelism.hybrid_dp.max_doc_len': max_doc_len})
  limit = hybrid_data.max_doc_len(c.parallelism.hybrid_dp)
  assert limit == (2 * C if max_doc_len == 0 else max_doc_len)
  docs = _documents(c)
  assert sorted(len(d) for d in docs) == sorted(LENGTHS)
  items = _epoch(c, docs)
  assert max(len(x) for x in items) == limit
  assert any(SEQ_LEN < len(x) for x in items)  # longer than seq_len, not cut to it
  pos = 0
  for d in docs:  # no shuffle: the stream follows the source order
    if len(d) < 2:
      continue  # nothing to predict (packing skips these too)
    if len(d) <= limit:
      np.testing.assert_array_equal(items[pos], d)  # whole
      pos += 1
      continue
    k = -(-(len(d) - 1) // (limit - 1))
    pieces = items[pos:pos + k]
    pos += k
    assert [len(p) for p in pieces[:-1]] == [limit] * (k - 1) and 2 <= len(pieces[-1]) <= limit
    # Neighbours share the boundary token: every (input, target) pair exactly once.
    pairs = [(int(a), int(b)) for p in pieces for a, b in zip(p[:-1], p[1:])]
    assert pairs == list(zip(d[:-1].tolist(), d[1:].tolist()))
    for a, b in zip(pieces, pieces[1:]):
      assert a[-1] == b[0]
  assert pos == len(items)


def test_real_tokens_counts_whole_documents():
  assert throughput.real_tokens([np.arange(5, dtype=np.int32), np.arange(3, dtype=np.int32)]) == 8


def test_cut_is_logged_once(corpus, caplog):
  c = _config(corpus)
  with caplog.at_level(logging.INFO, logger='loomax'):
    _epoch(c, _documents(c))
  cut = [r.getMessage() for r in caplog.records if 'is longer than' in r.getMessage()]
  assert len(cut) == 1 and 'parallelism.hybrid_dp.max_doc_len=32' in cut[0], cut


def test_resume_gives_the_same_next_batch(corpus):
  c = _config(corpus, **{'data.shuffle': True})
  it = hybrid_data.make_train_iterator(c)
  for _ in range(5):  # into the second epoch, mid-document (pieces of long ones)
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  again = hybrid_data.make_train_iterator(c)
  again.set_state(state)
  for want in expected:
    got = next(again)
    assert len(got) == len(want)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)


def test_bad_settings_name_the_key(corpus):
  mesh = mesh_lib.make_mesh(base.get_config().mesh)  # the pool of 8
  hybrid_data.check_config(_config(corpus), mesh)
  hybrid_data.check_config(_config(corpus, **{'parallelism.hybrid_dp.max_doc_len': 2 * C}), mesh)
  for bad in (-1, 1):
    with pytest.raises(ValueError, match=rf'parallelism\.hybrid_dp\.max_doc_len={bad}:'):
      hybrid_data.check_config(_config(corpus, **{'parallelism.hybrid_dp.max_doc_len': bad}),
                               mesh)
  with pytest.raises(ValueError, match=r'max_doc_len=34 \(34 tokens\).*largest group'):
    hybrid_data.check_config(_config(corpus, **{'parallelism.hybrid_dp.max_doc_len': 34}), mesh)
  with pytest.raises(ValueError, match=r'seq_len=33 .*eval row length.*max_doc_len=0 \(32'):
    hybrid_data.check_config(_config(corpus, seq_len=33), mesh)
  c = _config(corpus, seq_len=33, **{'parallelism.hybrid_dp.layouts': (1, 2, 4)})
  hybrid_data.check_config(c, mesh)  # a larger layout makes room: default 64


def test_stream_changes_refuse_another_cut_length(corpus):
  c = _config(corpus)  # max_doc_len 0 -> 32
  key = 'parallelism.hybrid_dp.max_doc_len'
  assert hybrid_data.stream_changes(c, {}) == []
  assert hybrid_data.stream_changes(c, {'seq_len': (16, SEQ_LEN)}) == []  # eval only
  assert hybrid_data.stream_changes(c, {key: (32, 0)}) == []  # the same length, spelt out
  assert hybrid_data.stream_changes(c, {key: (24, 0)})[0].startswith(key)
  assert hybrid_data.stream_changes(c, {'parallelism.hybrid_dp.capacity': (8, C)})[0].startswith(
      key)
  assert hybrid_data.stream_changes(c, {'batch_size': (8, BATCH)}) == ['batch_size']
  # A checkpoint from before the key existed cut documents at its seq_len.
  assert hybrid_data.stream_changes(c, {key: (None, 0), 'seq_len': (32, SEQ_LEN)}) == []
  assert hybrid_data.stream_changes(c, {key: (None, 0)})[0].startswith(key)
  c.parallelism.hybrid_dp.max_doc_len = 24  # an explicit length ignores capacity and layouts
  assert hybrid_data.stream_changes(c, {'parallelism.hybrid_dp.capacity': (8, C)}) == []


def _loop_config(corpus, **overrides):
  # One compiled layout (g = 1, capacity 32 -> max_doc_len 32) keeps the run cheap; the
  # planner's groups are tested in test_hybrid_dp.py.
  return tiny_config(**{'mesh.data': -1, 'log_every': 1, 'eval_every': 0, 'eval_batches': 1,
                        'batch_size': 8, 'seq_len': SEQ_LEN, 'optimizer.warmup_steps': 0,
                        'checkpoint.every': 2, 'checkpoint.async_save': False,
                        'model.num_layers': 1, 'model.d_model': 32, 'model.mlp_dim': 64,
                        'model.head_dim': 8, 'data.source': 'text',
                        'data.paths': str(corpus / '*.txt'), 'data.eval_fraction': 0.25,
                        'parallelism.hybrid_dp.enabled': True,
                        'parallelism.hybrid_dp.capacity': 2 * C,
                        'parallelism.hybrid_dp.layouts': (1,), **overrides})


def _same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_loop_trains_evaluates_and_resumes_the_stream(corpus, tmp_path):
  """train.py's loop with whole documents: it trains and runs eval/loss on seq_len rows; the
  data state it checkpoints after step 2 is the stream's after 2 batches and gives the same
  third batch; a resume restores it exactly, and refuses another max_doc_len."""
  first = str(tmp_path / 'a')
  c = _loop_config(corpus, steps=3)
  row = loop.run(c, first)
  assert np.isfinite(row['train/loss']) and np.isfinite(row['eval/loss'])
  assert row['hdp/micro_batches'] >= 1
  # Steps of whole documents: tokens/s counts their tokens (not batch_size x seq_len), no MFU.
  assert row['perf/tokens_per_sec'] == pytest.approx(row['perf/real_tokens_per_sec'])
  assert 'perf/mfu' not in row
  with open(f'{first}/checkpoints/2/data/process_0-of-1.json') as f:
    saved = json.load(f)
  fresh = hybrid_data.make_train_iterator(c)
  next(fresh), next(fresh)
  assert json.loads(json.dumps(fresh.get_state())) == saved
  restored = hybrid_data.make_train_iterator(c)
  restored.set_state(saved)
  _same_batches(next(restored), next(fresh))
  # Resuming at step 2 (steps=2: restore only, nothing left to train).
  second = str(tmp_path / 'b')
  out = loop.run(_loop_config(corpus, steps=2, resume=f'{first}/checkpoints', resume_step=2),
                 second)
  assert out['step'] == 2
  with open(f'{second}/metrics.jsonl') as f:
    start = json.loads(f.readline())
  assert start['event'] == 'run_start' and start['data'] == 'exact', start
  with pytest.raises(ValueError, match=r'parallelism\.hybrid_dp\.max_doc_len \(documents cut '
                     r'at 32 tokens in the checkpoint, 24 now\)'):
    loop.run(_loop_config(corpus, steps=2, resume=f'{first}/checkpoints', resume_step=2,
                          **{'parallelism.hybrid_dp.max_doc_len': 24}), str(tmp_path / 'c'))


def test_fsdp_counts_in_the_pool(corpus):
  """The start-up check sizes the pool as data x fsdp x context (layouts up to 8 on 4 x 2)."""
  from parallelism import mesh as mesh_lib
  c = _loop_config(corpus, **{'mesh.data': 4, 'mesh.fsdp': 2,
                              'parallelism.hybrid_dp.layouts': (1, 2, 4, 8)})
  hybrid_data.check_config(c, mesh_lib.make_mesh(c.mesh))
