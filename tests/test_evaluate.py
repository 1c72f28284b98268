"""scripts/evaluate.py and scripts/generate.py on a checkpoint of every family (untrained, so
the checkpoints cost no train-step compile): every task runs, results.json, PNGs and
TensorBoard scalars are written, and generation goes through the checkpoint."""

import json
import os

import jax
import numpy as np
import pytest

from checkpoint import metadata as ckpt_metadata
from checkpoint.manager import Checkpointer
from modeling.transformer import Runtime
from parallelism import mesh as mesh_lib
from tests.helpers import tiny_config
from training.evaluation import evals
from training.safety.run_files import write_config
from training.state import setup_model

FAMILIES = {
    'transformer': {},
    'cart': {'model.name': 'cart', 'model.cart.prelude_layers': 1, 'model.cart.loops': 2},
    'sambay': {'model.name': 'sambay', 'model.num_layers': 4, 'model.sambay.window': 16},
}


def write_checkpoint(config, workdir, step=3):
  """A parameters-only checkpoint (as convert_checkpoint.py --params-only writes) of random
  numpy parameters in the model's shapes: nothing to compile, which keeps the fixture cheap.
  Norm scales are 1, everything else N(0, 0.1)."""
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  setup = setup_model(config, mesh, Runtime())
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: np.ones(a.shape, a.dtype) if 'scale' in jax.tree_util.keystr(path)
      else (0.1 * rng.standard_normal(a.shape)).astype(a.dtype), setup.abstract.params)
  arrays = {p: a for p, a in ckpt_metadata.state_arrays(setup).items()
            if ckpt_metadata.item_of(p) == 'params'}
  write_config(config, workdir)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False)
  flat = {f'params/{p}': a for p, a in ckpt_metadata.flatten(params).items()}
  ckpt.save(step, flat, ckpt_metadata.describe(config, arrays, mesh), None, force=True)
  ckpt.close()
  return params


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  out = {}
  for family, overrides in FAMILIES.items():
    c = tiny_config(**{'model.d_model': 32, 'model.head_dim': 8, 'model.mlp_dim': 64,
                       **overrides})
    workdir = str(tmp_path_factory.mktemp(family))
    write_checkpoint(c, workdir)
    out[family] = workdir
  return out


@pytest.mark.parametrize('family', list(FAMILIES))
def test_evaluate_writes_every_task(runs, family, tmp_path):
  from scripts import evaluate
  out = str(tmp_path / 'ev')
  # Two lengths for the dense model (one too short for a passkey); one for the others.
  lengths = '64,256' if family == 'transformer' else '256'
  evaluate.main(['--checkpoint', runs[family], '--lengths', lengths, '--out', out,
                 '--eval_tokens', '512', '--passkey_samples', '1', '--mqar_pairs', '4,32',
                 '--mqar_samples', '1', '--blockwise_above', '128'])
  with open(os.path.join(out, 'results.json')) as f:
    r = json.load(f)
  assert r['family'] == family and r['step'] == 3
  assert set(r['loss']) == set(lengths.split(','))
  # Random parameters of a byte model: loss near ln(256) = 5.55 at every length.
  assert all(4.5 < v < 6.5 for v in r['loss'].values()), r['loss']
  buckets = r['position_loss']['256']['buckets']
  assert buckets[0] == [0, 1] and buckets[-1] == [128, 256]
  assert sum(r['position_loss']['256']['tokens']) > 0
  assert r['passkey']['lengths'] == [256]
  assert len(r['passkey']['accuracy'][0]) == len(evals.PASSKEY_DEPTHS)
  assert all(0 <= a <= 1 for a in r['mqar']['accuracy'][-1])
  if family == 'transformer':
    assert r['mqar']['accuracy'][0][1] is None                # 32 pairs do not fit in 64
    assert any('passkey L=64' in s for s in r['skipped'])     # nor does a passkey
  for name in ('loss', 'position_loss', 'passkey', 'mqar'):
    assert os.path.getsize(os.path.join(out, f'{name}.png')) > 1000
  assert os.listdir(os.path.join(out, 'tb'))


def test_context_parallel_eval_equals_data_parallel(runs, tmp_path):
  """The same numbers with ring attention over 4 devices (zigzag) as on the data axis."""
  from training.evaluation import serving
  settings = evals.EvalSettings(tasks=('loss', 'mqar'), lengths=(128,), eval_tokens=256,
                                mqar_pairs=(8,), mqar_samples=2)
  got = []
  for context in (1, 4):
    run = serving.load(runs['transformer'], context=context)
    ev = evals.Evaluator(run.config, run.mesh, run.setup.shardings.params, settings)
    got.append(evals.run_tasks(ev, run.params))
  np.testing.assert_allclose(got[0]['loss']['128'], got[1]['loss']['128'], rtol=1e-5)
  assert got[0]['mqar'] == got[1]['mqar']


def test_generate_cli(runs, capsys):
  """Through a checkpoint (greedy = full forward per family is tests/test_generate.py)."""
  from scripts import generate
  generate.main(['--checkpoint', runs['cart'], '--prompt', 'def ', '--max_new_tokens', '5',
                 '--num_samples', '2', '--stats', '--loops', '3'])
  out = capsys.readouterr().out
  assert out.count('def ') == 2 and '--- sample 1' in out
  assert 'decode 8 tokens' in out and 'cache' in out


def test_cli_help():
  from scripts import evaluate, generate
  for mod in (evaluate, generate):
    with pytest.raises(SystemExit) as e:
      mod.parse_args(['--help'])
    assert e.value.code == 0


def test_an_older_step_loads_with_its_own_config(tmp_path, caplog):
  """After a resume with another model.rope_theta, config.json is the new run's: a step saved
  before loads with the config it was trained with, and the difference is named (issue 27)."""
  import logging

  from training.evaluation import serving
  from training.safety.errors import UserError
  small = {'model.d_model': 32, 'model.head_dim': 8, 'model.mlp_dim': 64}
  c = tiny_config(**small)
  workdir = str(tmp_path)
  write_checkpoint(c, workdir)
  write_config(tiny_config(**small, **{'model.rope_theta': 500.0}), workdir)
  with caplog.at_level(logging.WARNING, logger='loomax'):
    run = serving.load(workdir, 3, devices=jax.devices()[:1])
  assert run.config.model.rope_theta == c.model.rope_theta
  assert any("model.rope_theta: 10000.0 in the step, 500.0 in config.json" in r.getMessage()
             for r in caplog.records)
  with pytest.raises(UserError, match=r'--step 99: no such checkpoint in .*; steps: 3$'):
    serving.load(workdir, 99)


def test_a_wrong_step_is_one_line_listing_the_steps(runs):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, 'scripts/generate.py', '--checkpoint', runs['transformer'],
                        '--step', '99', '--prompt', 'x'], cwd=root, capture_output=True,
                       text=True, timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr.strip().splitlines() == [
      f'generate.py: error: --step 99: no such checkpoint in {runs["transformer"]}/checkpoints; '
      'steps: 3']
