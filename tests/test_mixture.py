"""Data mixtures (training/data/mixture.py): weights respected over 10,000 documents, exact
resume of the training iterator, each component split and checked on its own, and the paper's
30/30/40 recipe in configs/cart_paper.py."""

import json

import numpy as np
import pytest

from configs import base, cart_paper
from training import data
from training.data import mixture

TAGS = 'abc'


@pytest.fixture
def corpus(tmp_path):
  """Three jsonl components; every document of component k starts with TAGS[k]."""
  paths = []
  for k, tag in enumerate(TAGS):
    path = tmp_path / f'{tag}.jsonl'
    with open(path, 'w') as f:
      for i in range(40 + 30 * k):
        f.write(json.dumps({'body': f'{tag}{i:04d} ' + 'x' * (i % 23)}) + '\n')
    paths.append(str(path))
  return paths


def make_config(paths, weights=(0.3, 0.3, 0.4), **component):
  c = base.get_config()
  c.seq_len, c.batch_size = 32, 4
  c.data.source = 'jsonl'
  c.data.eval_fraction = 0.1
  c.data.mixture = tuple(({'source': 'jsonl', 'paths': p, 'text_field': 'body', **component}, w)
                         for p, w in zip(paths, weights))
  return c


def _tag(doc) -> int:
  return TAGS.index(chr(int(np.asarray(doc)[0])))


def test_weights_within_one_percent_over_10000_documents(corpus):
  c = make_config(corpus)
  docs = mixture.documents(c, 'train')
  counts = np.bincount([_tag(docs[i]) for i in range(10_000)], minlength=3)
  np.testing.assert_allclose(counts / 10_000, [0.3, 0.3, 0.4], atol=0.01)
  # Exact over shorter windows too (grain interleaves deterministically), from any start.
  window = np.bincount([_tag(docs[i]) for i in range(5_000, 5_100)], minlength=3)
  np.testing.assert_allclose(window / 100, [0.3, 0.3, 0.4], atol=0.02)
  assert [mixture.component_of(c, i) for i in range(20)] == [_tag(docs[i]) for i in range(20)]


def test_components_shuffle_and_split_on_their_own(corpus):
  c = make_config(corpus)
  train = mixture.documents(c, 'train')
  held = mixture.eval_documents(c)
  train_docs = {bytes(np.asarray(train[i], np.uint8)) for i in range(2_000)}
  eval_docs = {bytes(np.asarray(held[i], np.uint8)) for i in range(len(held))}
  assert eval_docs and not train_docs & eval_docs, 'a held-out document was trained on'
  assert {d[:1] for d in eval_docs} == {b'a', b'b', b'c'}, 'every component holds some out'
  firsts = [bytes(np.asarray(train[i], np.uint8))[:5] for i in range(10)]
  assert firsts != sorted(firsts)   # shuffled inside each component
  other_seed = make_config(corpus)
  other_seed.seed = 1
  assert [bytes(np.asarray(mixture.documents(other_seed, 'train')[i], np.uint8))
          for i in range(10)] != [bytes(np.asarray(train[i], np.uint8)) for i in range(10)]


def test_training_iterator_resumes_exactly(corpus):
  c = make_config(corpus)
  it = data.make_train_iterator(c)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expect = [next(it) for _ in range(4)]
  again = data.make_train_iterator(c)
  again.set_state(state)
  for a, b in zip(expect, [next(again) for _ in range(4)]):
    for key in ('inputs', 'targets', 'segment_ids', 'positions'):
      np.testing.assert_array_equal(a[key], b[key])
  # Held-out batches come from the components' eval splits.
  assert data.make_eval_batches(c, num_batches=1)[0]['inputs'].shape == (4, 32)


def test_each_component_is_checked(corpus, tmp_path):
  with pytest.raises(ValueError, match=r'data.mixture\[0\] tokenizer'):
    mixture.components(make_config(corpus, tokenizer='hf:/nowhere/tokenizer.json'))
  bad = make_config(corpus)
  bad.data.mixture = (({'source': 'jsonl', 'paths': corpus[0], 'shuffle': False}, 1.0),)
  with pytest.raises(ValueError, match='a component may set'):
    mixture.components(bad)
  with pytest.raises(ValueError, match='weights must be > 0'):
    mixture.components(make_config(corpus, weights=(0.5, 0.5, 0.0)))
  # A component whose documents miss the text field fails on its own file, named.
  wrong = make_config(corpus)
  wrong.data.mixture = wrong.data.mixture[:2] + (
      ({'source': 'jsonl', 'paths': corpus[2], 'text_field': 'text'}, 0.4),)
  docs = mixture.documents(wrong, 'train')
  with pytest.raises(ValueError, match="c.jsonl:.*data.text_field='text'"):
    for i in range(20):
      docs[i]
  # The vocabulary check runs per component (byte tokens need 256 ids).
  small = make_config(corpus)
  small.model.vocab_size = 100
  with pytest.raises(ValueError, match='vocab'):
    mixture.documents(small, 'train')


def test_cart_paper_recipe_is_30_30_40():
  c = cart_paper.get_config('512,6')
  weights = [w for _, w in c.data.mixture]
  np.testing.assert_allclose(weights, [0.3, 0.3, 0.4])
  names = [keys['paths'] for keys, _ in c.data.mixture]
  assert any('tinystories' in n for n in names) and any('wikipedia' in n for n in names) \
      and any('fineweb' in n for n in names)
  assert all(keys['source'] == 'array_record' for keys, _ in c.data.mixture)
