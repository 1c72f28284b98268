"""Training: the loss falls, accumulation is exact, the loop writes metrics and events,
and errors are clear."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.helpers import Trainer, random_batch, tiny_config
from training import loop
from training.optimizer import decay_mask, learning_rate_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = {'mesh.data': 1}


def test_steps_lower_loss_on_fixed_batch():
  t = Trainer(tiny_config(**ONE_DEVICE), devices=jax.devices()[:1])
  b = random_batch(t.config)
  losses = t.train([b] * 8)
  assert losses[-1] < losses[0] - 0.5, losses


def test_grad_accumulation_equals_full_batch():
  batches = [random_batch(tiny_config(), seed=s) for s in range(2)]
  full = Trainer(tiny_config(**ONE_DEVICE), devices=jax.devices()[:1])
  accum = Trainer(tiny_config(**ONE_DEVICE, **{'optimizer.grad_accum_steps': 4}),
                  devices=jax.devices()[:1])
  np.testing.assert_allclose(accum.train(batches), full.train(batches), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               accum.params(), full.params())


def test_schedules():
  c = tiny_config()
  c.optimizer.update(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
  for name in ('cosine', 'wsd', 'constant'):
    c.optimizer.schedule = name
    s = learning_rate_schedule(c.optimizer, 100)
    assert float(s(0)) == 0.0 and abs(float(s(10)) - 1.0) < 1e-6, name
    if name != 'constant':
      assert abs(float(s(100)) - 0.1) < 1e-6, name
  c.optimizer.decay_fraction = 0.2
  c.optimizer.schedule = 'wsd'
  assert float(learning_rate_schedule(c.optimizer, 100)(79)) == 1.0  # still stable before decay
  c.optimizer.schedule = 'linear'
  with pytest.raises(ValueError, match="optimizer.schedule='linear'"):
    learning_rate_schedule(c.optimizer, 100)


def test_weight_decay_skips_norms():
  axes = {'norm': {'scale': ('embed',)}, 'stacked_norm': ('layers', 'embed'),
          'w': ('embed', 'mlp'), 'stacked_w': ('layers', 'embed', 'mlp')}
  mask = decay_mask(axes, decay_norms_and_biases=False)
  assert mask == {'norm': {'scale': False}, 'stacked_norm': False, 'w': True, 'stacked_w': True}


def read_events(logdir):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(logdir)
  acc.Reload()
  return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """configs/tiny.py shrunk by overrides, through the real loop on 2 data-parallel devices."""
  workdir = str(tmp_path_factory.mktemp('run'))
  c = tiny_config(**{'mesh.data': -1, 'steps': 6, 'log_every': 2, 'eval_every': 4,
                     'eval_batches': 1, 'batch_size': 8, 'profile_steps': 1,
                     'profile_start': 2})
  row = loop.run(c, workdir)
  return workdir, row


def test_loop_writes_metrics_and_events(tiny_run):
  workdir, row = tiny_run
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  train_rows = [r for r in rows if 'train/loss' in r]
  assert [r['step'] for r in train_rows] == [2, 4, 6]
  for key in ('train/lr', 'train/grad_norm', 'perf/tokens_per_sec', 'perf/mfu'):
    assert all(np.isfinite(r[key]) for r in train_rows), key
  assert [r['step'] for r in rows if 'eval/loss' in r] == [4, 6]
  events = read_events(os.path.join(workdir, 'tb'))
  for tag in ('train/loss', 'train/lr', 'train/grad_norm', 'perf/tokens_per_sec', 'perf/mfu',
              'eval/loss'):
    assert tag in events, tag
  np.testing.assert_allclose(events['train/loss'], [r['train/loss'] for r in train_rows],
                             rtol=1e-6)
  assert row['eval/loss'] == rows[-1]['eval/loss']
  assert json.load(open(os.path.join(workdir, 'config.json')))['model']['d_model'] == 64
  traces = [f for _, _, files in os.walk(os.path.join(workdir, 'tb', 'plugins', 'profile'))
            for f in files]
  assert any(f.endswith('.xplane.pb') for f in traces), traces


def test_loop_resumes_from_its_checkpoint(tiny_run, tmp_path):
  workdir, _ = tiny_run
  c = tiny_config(**{'mesh.data': -1, 'steps': 8, 'log_every': 2, 'eval_every': 0,
                     'eval_batches': 1, 'resume': 'auto'})
  row = loop.run(c, workdir)
  assert row['step'] == 8
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in rows if 'train/loss' in r] == [2, 4, 6, 8]


def test_non_finite_loss_names_the_step(tmp_path):
  c = tiny_config(**{'mesh.data': 1, 'steps': 20, 'optimizer.lr': 1e30,
                     'optimizer.clip_norm': 0.0, 'optimizer.warmup_steps': 0,
                     'optimizer.schedule': 'constant'})
  c.mesh.data = -1
  with pytest.raises(loop.NonFiniteLoss, match=r'at step \d+'):
    loop.run(c, str(tmp_path))


def run_train_py(*args, timeout=300):
  env = {**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=env)


def test_unknown_config_key_is_an_error(tmp_path):
  out = run_train_py('--config', 'configs/tiny.py', '--workdir', str(tmp_path),
                     '--config.model.num_layerz=3')
  assert out.returncode != 0
  assert out.stderr.strip().splitlines() == [
      "train.py: error: unknown config key 'model.num_layerz' (from --config.model.num_layerz); "
      "did you mean 'model.num_layers'?"]


def test_train_py_end_to_end(tmp_path):
  out = run_train_py('--config', 'configs/tiny.py', '--workdir', str(tmp_path),
                     '--config.steps=4', '--config.log_every=2', '--config.model.num_layers=1',
                     '--config.model.d_model=32', '--config.model.num_heads=2',
                     '--config.model.num_kv_heads=1', '--config.model.head_dim=16',
                     '--config.model.mlp_dim=64', '--config.seq_len=32', '--config.batch_size=4',
                     '--config.eval_batches=1', '--config.perf.peak_flops=1e12')
  assert out.returncode == 0, out.stderr[-3000:]
  # stderr is not a terminal here, so the rows are logged as lines (a cluster log file).
  step_lines = [line for line in out.stderr.splitlines() if '] step ' in line and 'loss' in line]
  assert len(step_lines) == 2, out.stderr[-3000:]
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert rows[-1]['step'] == 4 and np.isfinite(rows[-1]['eval/loss'])
  assert os.listdir(tmp_path / 'checkpoints')
