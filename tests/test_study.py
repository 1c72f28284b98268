"""The study harness (training/evaluation/study.py, scripts/study.py): intervals, the three-way verdict,
no verdict from one seed, resumable runs (finished ones skipped), and the written report."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from training.evaluation import study as study_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_t_interval_matches_the_formula():
  mean, low, high = study_lib.t_interval([1.0, 2.0, 3.0])
  assert mean == 2.0
  np.testing.assert_allclose(high - mean, 4.302652729911275 / np.sqrt(3), rtol=1e-9)
  assert low == pytest.approx(2 * mean - high)
  with pytest.raises(ValueError, match='at least 2'):
    study_lib.t_interval([1.0])


def test_verdicts_and_pairing():
  assert study_lib.verdict(-0.3, -0.1) == study_lib.SUPPORTED
  assert study_lib.verdict(0.1, 0.3) == study_lib.CONTRADICTED
  assert study_lib.verdict(-0.1, 0.3) == study_lib.INCONCLUSIVE
  # Paired by seed: a constant per-seed gap is a sure difference however noisy the seeds are.
  a, b = {0: 1.0, 1: 5.0, 2: 9.0}, {0: 1.1, 1: 5.1, 2: 9.1}
  c = study_lib.compare(a, b)
  assert c['diff'] == pytest.approx(-0.1) and c['verdict'] == study_lib.SUPPORTED
  with pytest.raises(ValueError, match='no verdict from 1 seed'):
    study_lib.compare({0: 1.0}, {0: 2.0, 1: 3.0})


def _base():
  c = tiny.get_config()
  c.steps, c.batch_size, c.seq_len, c.eval_batches = 2, 8, 32, 1
  c.optimizer.warmup_steps = 1
  c.perf.peak_trials = 1
  c.model.update(num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
  return c


def _study(seeds=(0, 1), downstream=None):
  arms = [study_lib.Arm('one', {}, 'one layer'),
          study_lib.Arm('two', {'model.num_layers': 2}, 'two layers',
                        evals={'shared': {'kv_plan': _plan()}})]
  checked = []
  study = study_lib.Study('toy', 'Toy study', _base, arms,
                          [study_lib.Comparison('two', 'one', 'depth helps'),
                           study_lib.Comparison('two@shared', 'two', 'sharing is free')],
                          seeds=seeds, budget='Budget: 2 steps.',
                          check=lambda arm, c, m: checked.append(arm.name), smoke=True,
                          downstream=downstream)
  return study, checked


def _plan():
  from modeling.kv_routing import CachePlan
  return CachePlan.every(2, 2)


def test_one_seed_is_refused(tmp_path):
  study, _ = _study(seeds=(0,))
  with pytest.raises(ValueError, match='no verdict from one seed'):
    study_lib.run_study(study, str(tmp_path / 'runs'), str(tmp_path / 'out'))


def test_unknown_metric_is_refused(tmp_path):
  study, _ = _study()
  study.comparisons.append(study_lib.Comparison('three', 'one', 'x'))
  with pytest.raises(ValueError, match="unknown metric 'three'"):
    study_lib.run_study(study, str(tmp_path / 'runs'), str(tmp_path / 'out'))


def test_runs_resumably_and_writes_the_report(tmp_path, monkeypatch):
  from training.evaluation.downstream import Files
  text = tmp_path / 'text.txt'
  text.write_text('abcd ' * 30)
  study, checked = _study(downstream=Files(text=str(text)))
  runs, out = str(tmp_path / 'runs'), str(tmp_path / 'out')
  report = study_lib.run_study(study, runs, out, command='python toy')
  assert checked == ['one', 'two']
  for arm in ('one', 'two'):
    for seed in (0, 1):
      assert os.path.exists(os.path.join(runs, 'toy', arm, f'seed_{seed}', 'result.json'))
  assert [a['seeds'] for a in report['arms']] == [[0, 1], [0, 1]]
  one, two = report['arms']
  assert two['stored_params'] > one['stored_params'] and one['tokens'] == 2 * 8 * 32
  assert one['loss']['low'] <= one['loss']['mean'] <= one['loss']['high']
  assert 'shared' in two['variants']
  # Downstream tasks scored on every trained model, with an interval over seeds.
  ppl = one['diagnostics']['perplexity/perplexity']
  assert ppl['low'] <= ppl['mean'] <= ppl['high'] and 50 < ppl['mean'] < 1000
  assert {c['verdict'] for c in report['comparisons']} <= {
      study_lib.SUPPORTED, study_lib.CONTRADICTED, study_lib.INCONCLUSIVE}
  # Different seeds train differently (seeded params and data order).
  losses = {(r['arm'], r['seed']): r['loss'] for r in report['runs']}
  assert losses[('one', 0)] != losses[('one', 1)]
  md = open(os.path.join(out, 'toy.md')).read()
  assert 'SMOKE' in md and '95%' in md and 'depth helps' in md and 'python toy' in md
  assert 'holds' not in md
  # Each run records its process CPU time and the load it ended under; the report shows both.
  assert all(r['cpu_s'] > 0 and r['load_1m'] >= 0 for r in report['runs'])
  assert one['cpu_s'] > 0 and one['load_1m_max'] is not None and '| CPU s | load |' in md
  assert json.load(open(os.path.join(out, 'toy.json')))['study'] == 'toy'
  assert os.path.getsize(os.path.join(out, 'toy.png')) > 0
  # A second call trains nothing: every (arm, seed) has its result.
  from training import loop
  monkeypatch.setattr(loop, 'run', lambda *a, **k: pytest.fail('a finished run was retrained'))
  again = study_lib.run_study(study, runs, out, command='python toy', note='a loaded machine')
  assert again['runs'] == report['runs']
  assert '- note: a loaded machine' in open(os.path.join(out, 'toy.md')).read()


def test_cli_refuses_one_seed_before_importing_jax():
  out = subprocess.run([sys.executable, 'scripts/study.py', 'cart', '--seeds', '0'], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and 'no verdict from one seed' in out.stderr, out.stderr


def test_study_smoke_configs_exercise_their_mechanism():
  """Every study's smoke arms pass its mechanism check (R > 1, GMU layers, routing on)."""
  import importlib

  import ml_collections
  from flax import nnx

  from modeling import registry
  for name in ('cart', 'sambay', 'kv_routing'):
    study = importlib.import_module(f'scripts.study_{name}').make_study(smoke=True)
    assert len(study.arms) >= 2
    for arm in study.arms:
      config = study_lib.arm_config(study, arm, 0)
      frozen = ml_collections.FrozenConfigDict(config.model)
      study.check(arm, config, nnx.eval_shape(
          lambda f=frozen: registry.build_model(f, rngs=nnx.Rngs(0))))
