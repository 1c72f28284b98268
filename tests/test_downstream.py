"""Downstream evaluations from local files (training/evaluation/downstream.py) on made-up files with known
answers: a model that copies from its context scores accuracy 1, a uniform model chance; the
HellaSwag / PIQA / ARC layouts; perplexity of a uniform model is the vocabulary size."""

import json
import math

import numpy as np
import pytest

from configs import base
from training.evaluation import downstream, evals

V = 256
EPS = 1e-3


class FakeEvaluator:
  """`Evaluator.run` for a model given as a function row -> predicted next token per position
  (probability 1 - EPS on it, the rest spread evenly), or None: uniform over V."""

  def __init__(self, predict=None, seq_len=64):
    c = base.get_config()
    c.seq_len = seq_len
    self.config, self.predict = c, predict

  def run(self, params, rows, length):
    nll, arg = [], []
    for r in rows:
      assert r['inputs'].shape == (length,)
      if self.predict is None:
        nll.append(np.full(length, math.log(V)))
        arg.append(np.zeros(length, np.int32))
        continue
      pred = self.predict(r['inputs'])
      hit = pred == np.maximum(r['targets'], 0)
      nll.append(np.where(hit, -math.log(1 - EPS + EPS / V), -math.log(EPS / V)))
      arg.append(pred)
    return np.stack(nll), np.stack(arg)


def copier(inputs, n=4):
  """Predicts the token that followed the latest earlier occurrence of the longest (up to n)
  suffix ending here: an induction-head model that copies from its context."""
  out = np.zeros(len(inputs), np.int32)
  seq = inputs.tolist()
  for t in range(len(seq)):
    for k in range(min(n, t + 1), 0, -1):
      suffix = seq[t - k + 1:t + 1]
      hits = [j for j in range(k - 1, t) if seq[j - k + 1:j + 1] == suffix]
      if hits:
        out[t] = seq[hits[-1] + 1]
        break
  return out


WORDS = ['qwert', 'yuiop', 'asdfg', 'hjklz', 'xcvbn', 'mnbvc', 'lkjhg', 'poiuy']


def _write(path, rows):
  with open(path, 'w') as f:
    for r in rows:
      f.write(json.dumps(r) + '\n')
  return str(path)


@pytest.fixture
def lambada_file(tmp_path):
  rng = np.random.default_rng(0)
  rows = []
  for _ in range(12):
    w = list(rng.permutation(WORDS)[:4])
    rows.append({'text': ' '.join(w + w)})      # the last word repeats the first copy's
  return _write(tmp_path / 'lambada.jsonl', rows)


def _choices(rng, right):
  wrong = [w for w in WORDS if w not in right]
  return list(rng.permutation(wrong)[:3])


@pytest.fixture
def choice_file(tmp_path):
  """8 questions per layout; the right answer appears in the context; labels cycle so each
  position is right equally often; every choice has the same length."""
  rng = np.random.default_rng(1)
  rows = []
  for i in range(8):
    a, b, right = rng.permutation(WORDS)[:3]
    ctx = f'{a} {b} {right}. {a} {b}'
    wrong = [w for w in WORDS if w not in (a, b, right)][:3]
    label = i % 4
    choices = wrong[:label] + [right] + wrong[label:]
    rows.append({'ctx': ctx, 'endings': choices, 'label': label})                 # HellaSwag
    rows.append({'goal': ctx, 'sol1': choices[label] if i % 2 == 0 else wrong[0],  # PIQA
                 'sol2': wrong[0] if i % 2 == 0 else choices[label], 'label': i % 2})
    rows.append({'question': ctx, 'choices': {'text': choices, 'label': list('ABCD')},
                 'answerKey': 'ABCD'[label]})                                       # ARC
  return _write(tmp_path / 'choices.jsonl', rows)


def test_lambada_copier_gets_1_uniform_gets_0(lambada_file):
  out = downstream.lambada(FakeEvaluator(copier), None, lambada_file)
  assert out['accuracy'] == 1.0 and out['examples'] == 12
  assert out['perplexity'] < 1.01
  uniform = downstream.lambada(FakeEvaluator(), None, lambada_file)
  assert uniform['accuracy'] == 0.0
  # The word is ' ' + 5 letters = 6 byte tokens, each at probability 1/V.
  np.testing.assert_allclose(uniform['perplexity'], V ** 6, rtol=1e-9)


def test_multiple_choice_copier_gets_1_uniform_gets_chance(choice_file):
  out = downstream.multiple_choice(FakeEvaluator(copier), None, choice_file)
  assert out['acc'] == out['acc_norm'] == 1.0 and out['examples'] == 24
  uniform = downstream.multiple_choice(FakeEvaluator(), None, choice_file)
  # Ties go to the first choice; the right one is first in 1/4 (HellaSwag, ARC) and 1/2
  # (PIQA) of the questions: exactly the chance rate.
  assert uniform['acc'] == uniform['acc_norm'] == pytest.approx(uniform['chance'])
  assert uniform['chance'] == pytest.approx((8 * 0.25 * 2 + 8 * 0.5) / 24)


def test_layouts_and_errors():
  assert downstream.choice_example({'ctx': 'c', 'endings': ['a', 'b'], 'label': '1'}, 'x') == \
      ('c', ['a', 'b'], 1)
  assert downstream.choice_example({'goal': 'g', 'sol1': 'a', 'sol2': 'b', 'label': 0}, 'x') == \
      ('g', ['a', 'b'], 0)
  assert downstream.choice_example(
      {'question': 'q', 'choices': {'text': ['a', 'b', 'c'], 'label': ['1', '2', '3']},
       'answerKey': '3'}, 'x') == ('q', ['a', 'b', 'c'], 2)
  with pytest.raises(ValueError, match='no known multiple-choice layout'):
    downstream.choice_example({'prompt': 'p'}, 'f.jsonl:3')
  with pytest.raises(ValueError, match='--text_file'):
    downstream.run('perplexity', FakeEvaluator(), None, downstream.Files())


def test_perplexity_of_a_text_file(tmp_path):
  path = tmp_path / 'wiki.txt'
  text = 'the quick brown fox jumps over the lazy dog. ' * 20
  path.write_text(text)
  uniform = downstream.perplexity(FakeEvaluator(seq_len=32), None, str(path))
  assert uniform['tokens'] == len(text) - 1
  np.testing.assert_allclose(uniform['perplexity'], V, rtol=1e-9)
  np.testing.assert_allclose(uniform['bits_per_byte'], 8.0, rtol=1e-9)   # log2(256) per byte
  periodic = tmp_path / 'periodic.txt'
  periodic.write_text('abcd ' * 60)    # after one period a copier predicts every byte
  copy = downstream.perplexity(FakeEvaluator(copier, seq_len=64), None, str(periodic))
  assert copy['perplexity'] < V / 10


def test_registered_as_eval_tasks():
  assert set(downstream.TASKS) <= set(evals.TASKS)
  settings = evals.EvalSettings(tasks=('lambada',), files=downstream.Files(lambada='x.jsonl'))
  assert settings.files.lambada == 'x.jsonl'
  results = {'lambada': {'accuracy': 0.5, 'perplexity': 3.0, 'examples': 2}}
  assert evals.scalars(results) == {'eval/lambada/accuracy': 0.5, 'eval/lambada/perplexity': 3.0}


def test_evaluate_cli_runs_the_downstream_tasks(tmp_path, lambada_file, choice_file):
  """scripts/evaluate.py --tasks lambada,multiple_choice,perplexity on a random checkpoint:
  results.json holds every task, TensorBoard their scalars."""
  from scripts import evaluate
  from tests.helpers import tiny_config
  from tests.test_evaluate import write_checkpoint
  c = tiny_config(**{'model.d_model': 32, 'model.head_dim': 8, 'model.mlp_dim': 64,
                     'seq_len': 64})
  workdir = str(tmp_path / 'run')
  write_checkpoint(c, workdir)
  text = tmp_path / 'wiki.txt'
  text.write_text('abcd ' * 40)
  out = str(tmp_path / 'ev')
  evaluate.main(['--checkpoint', workdir, '--out', out,
                 '--tasks', 'lambada,multiple_choice,perplexity', '--lambada_file', lambada_file,
                 '--choice_file', choice_file, '--text_file', str(text)])
  with open(f'{out}/results.json') as f:
    r = json.load(f)
  assert 0 <= r['lambada']['accuracy'] <= 1 and r['lambada']['examples'] == 12
  assert 0 <= r['multiple_choice']['acc_norm'] <= 1 and r['multiple_choice']['examples'] == 24
  # Random parameters of a byte model: near-uniform, perplexity in the hundreds.
  assert 100 < r['perplexity']['perplexity'] < 1000, r['perplexity']
