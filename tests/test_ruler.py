"""RULER-style suite (training/evaluation/ruler.py): examples are deterministic and exactly sized for any
tokenizer, the needle sits once at the requested depth, a scripted scorer that reads the
answer out of the prompt gets 100% on every task, uniform guessing and an untrained model get
~0, and `evaluate.py --tasks ruler` writes the table, the heatmap and the scalars."""

import collections
import json
import os
import re

import numpy as np
import pytest

from tests.helpers import tiny_config
from training.evaluation import ruler
from training.data import tokenizer

LENGTHS = (256, 1024)


class PairTokenizer:
  """Two characters per token, ids handed out on first sight: not byte-aligned, to show the
  suite needs nothing of the tokenizer but encode/decode."""
  spec, vocab_size = 'pairs', 4096

  def __init__(self):
    self.ids: dict[str, int] = {}
    self.text: list[str] = []

  def encode(self, text):
    out = []
    for i in range(0, len(text), 2):
      piece = text[i:i + 2]
      if piece not in self.ids:
        self.ids[piece] = len(self.text)
        self.text.append(piece)
      out.append(self.ids[piece])
    return np.asarray(out, np.int32)

  def decode(self, ids):
    return ''.join(self.text[i] for i in np.asarray(ids) if 0 <= i < len(self.text))


def solve(task: str, prompt: str) -> str:
  """A scripted reader: the answer recovered from the prompt text alone (copying the needle)."""
  question = prompt.rsplit('\n', 1)[1]
  facts = dict()
  for k, v in re.findall(r'The magic number for (\S+) is (\d+)\. ', prompt):
    facts.setdefault(k, []).append(v)
  if task in ('niah_single', 'niah_multikey'):
    return ' ' + facts[re.match(r'The magic number for (\S+) is', question)[1]][0]
  if task == 'niah_multivalue':
    return ' ' + ', '.join(facts[re.match(r'All magic numbers for (\S+) are', question)[1]])
  if task == 'niah_multiquery':
    keys = re.match(r'The magic numbers for (.+) are', question)[1].split(', ')
    return ' ' + ', '.join(facts[k][0] for k in keys)
  if task == 'vt':
    value = re.search(r'holding (\d+) are', question)[1]
    holds = set(re.findall(rf'VAR (\w+) = {value}\. ', prompt))
    for a, b in re.findall(r'VAR (\w+) = VAR (\w+)\. ', prompt) * 8:
      if b in holds:
        holds.add(a)
    return ' ' + ' '.join(sorted(holds))
  body = prompt.split('\n')[1]
  n = int(re.search(r'The (\d+) most', question)[1])
  counts = collections.Counter(w for w in body.split(' ') if re.fullmatch(r'[a-z]+', w)
                               and len(w) >= 4)
  return ' ' + ' '.join(w for w, _ in counts.most_common(n))


def oracle(tok, samples_seen):
  def answer(prompts, max_new):
    out = np.zeros((len(prompts), max_new), np.int32)
    for i, p in enumerate(prompts):
      text = tok.decode(p)
      task = samples_seen[text]
      ids = tok.encode(solve(task, text))[:max_new]
      out[i, :len(ids)] = ids
    return out
  return answer


@pytest.mark.parametrize('tok', [tokenizer.load('bytes'), PairTokenizer()], ids=['bytes', 'pairs'])
def test_scripted_reader_scores_100_and_uniform_scores_0(tok):
  settings = ruler.Settings(samples=3)
  seen = {}
  for task in ruler.TASKS:
    for L in LENGTHS:
      depths = settings.depths if task == 'niah_single' else [None]
      for d in depths:
        for i in range(settings.samples):
          try:
            s = ruler.make_sample(task, tok, L, i, settings.seed, depth=d)
          except ruler.DoesNotFit:
            continue
          seen[tok.decode(s.prompt)] = task
  res = ruler.run(oracle(tok, seen), tok, LENGTHS, settings)
  scored = [v for row in res['score'] for v in row if v is not None]
  assert len(scored) >= 9 and all(v == 1.0 for v in scored), ruler.table(res)
  assert res['average'] == [1.0, 1.0]
  assert res['niah_depth']['score'] == [[1.0] * 5, [1.0] * 5]
  # Every task fits at 1024 tokens; the ones too long for 256 are skipped and said so.
  assert all(row[1] is not None for row in res['score'])
  assert len(res['skipped']) == sum(row[0] is None for row in res['score'])
  rng = np.random.default_rng(0)
  uniform = ruler.run(lambda p, n: rng.integers(0, tok.vocab_size, (len(p), n)), tok, LENGTHS,
                      settings)
  assert max(v for v in uniform['average'] if v is not None) <= 0.02


def test_examples_are_deterministic_exact_length_and_hold_the_needle_once():
  tok = tokenizer.load('bytes')
  for task in ruler.TASKS:
    a = ruler.make_sample(task, tok, 1024, 5, 7)
    b = ruler.make_sample(task, tok, 1024, 5, 7)
    c = ruler.make_sample(task, tok, 1024, 6, 7)
    np.testing.assert_array_equal(a.prompt, b.prompt)
    assert a.answers == b.answers and not np.array_equal(a.prompt, c.prompt)
    assert len(a.prompt) == 1024 - ruler.answer_budget(task, tok)
  for depth in ruler.DEPTHS:
    s = ruler.make_sample('niah_single', tok, 2048, 0, 1, depth=depth)
    text = tok.decode(s.prompt)
    assert text.count(s.answers[0]) == 1          # the needle, once; the question asks the key
    at = text.index(s.answers[0]) / len(text)
    assert abs(at - depth) < 0.1 and abs(s.depth - depth) < 0.05
  with pytest.raises(ValueError, match=r'eval.ruler_tasks: unknown \[.qa.\]'):
    ruler.Settings(tasks=('qa',))
  assert ruler.parse_tasks('all') == ruler.TASKS and ruler.parse_tasks('vt,cwe') == ('vt', 'cwe')


def test_untrained_model_through_the_decode_cache_scores_about_0():
  from flax import nnx

  from modeling import registry
  c = tiny_config(**{'model.d_model': 32, 'model.head_dim': 8, 'model.mlp_dim': 64})
  model = registry.build_model(c.model, rngs=nnx.Rngs(0))
  params = nnx.state(model)
  res = ruler.evaluate(c, params, (256,), ruler.Settings(tasks=('niah_single', 'vt'), samples=1,
                                                         rows=4))
  assert res['score'] == [[0.0], [0.0]]
  assert len(res['examples']['vt/256']['generated']) > 0


def test_evaluate_cli_writes_table_heatmap_and_scalars(tmp_path):
  from scripts import evaluate
  from tests.test_evaluate import write_checkpoint
  c = tiny_config(**{'model.d_model': 32, 'model.head_dim': 8, 'model.mlp_dim': 64})
  workdir = str(tmp_path / 'run')
  write_checkpoint(c, workdir)
  out = str(tmp_path / 'ev')
  evaluate.main(['--checkpoint', workdir, '--tasks', 'ruler', '--lengths', '256,1024',
                 '--ruler_samples', '1', '--ruler_tasks', 'niah_single,niah_multikey,fwe',
                 '--out', out])
  res = json.load(open(os.path.join(out, 'results.json')))['ruler']
  assert res['lengths'] == [256, 1024] and res['tasks'] == ['niah_single', 'niah_multikey', 'fwe']
  assert res['score'][1][0] is None and res['score'][1][1] is not None   # MK does not fit 256
  for name in ('ruler.md', 'ruler.png', 'ruler_niah_depth.png'):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  assert '| **average** |' in open(os.path.join(out, 'ruler.md')).read()
  assert os.listdir(os.path.join(out, 'tb'))
  from training.evaluation import evals
  tags = evals.scalars({'ruler': res})
  assert 'eval/ruler/average/len_1024' in tags and \
      'eval/ruler/niah_depth/len_256/depth_0.50' in tags
