"""Config mistakes get clear answers: unknown keys, a context axis without an implementation,
more tensor shards than kv heads (replicated, exact vs one device), and a dry run."""

import logging
import os

import jax
import numpy as np

from parallelism import mesh as mesh_lib
from tests.helpers import Trainer, random_batch, tiny_config
from training import composition, loop, overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_key_one_line_with_suggestion():
  argv = ['train.py', '--config', os.path.join(ROOT, 'configs/tiny.py'), '--workdir', 'w',
          '--config.steps=3', '--config.model.num_layer=3']
  message = overrides.unknown_key_error(argv)
  assert message == ("unknown config key 'model.num_layer' (from --config.model.num_layer); "
                     "did you mean 'model.num_layers'?")
  assert 'did you mean' in overrides.unknown_key_error(
      argv[:-1] + ['--config.optimiser.lr=1'])
  assert overrides.unknown_key_error(argv[:-1]) is None


def test_context_axis_without_implementation_warns(caplog):
  c = tiny_config(**{'mesh.data': 4, 'mesh.context': 2})
  mesh = mesh_lib.make_mesh(c.mesh)
  with caplog.at_level(logging.WARNING, logger='loomax'):
    composition.make_attend(c, mesh)
  assert any("mesh.context=2 with parallelism.context_impl='none'" in r.getMessage()
             for r in caplog.records)
  caplog.clear()
  c.parallelism.context_impl = 'ring'
  with caplog.at_level(logging.WARNING, logger='loomax'):
    composition.make_attend(c, mesh)
  assert not caplog.records


def test_kv_heads_replicated_when_tensor_exceeds_them():
  """tensor=4 with num_kv_heads=2: K/V projections are replicated over tensor, queries are
  sharded, and forward loss plus two training steps match one device."""
  overrides_ = {'model.num_heads': 4, 'model.num_kv_heads': 2}
  batches = [random_batch(tiny_config(), seed=s) for s in range(2)]
  one = Trainer(tiny_config(**overrides_, **{'mesh.data': 1}), devices=jax.devices()[:1])
  sharded = Trainer(tiny_config(**overrides_, **{'mesh.data': 2, 'mesh.tensor': 4}))
  specs = {jax.tree_util.keystr(p): x.sharding.spec
           for p, x in jax.tree_util.tree_flatten_with_path(sharded.state.params)[0]}
  wk = [s for k, s in specs.items() if k.endswith("['wk']")]
  wq = [s for k, s in specs.items() if k.endswith("['wq']")]
  assert wk and all('tensor' not in str(s) for s in wk), wk
  assert wq and all('tensor' in str(s) for s in wq), wq
  eval_one = one.program.eval_step(one.state.params, one.program.global_batch(batches[0]))
  eval_sharded = sharded.program.eval_step(sharded.state.params,
                                           sharded.program.global_batch(batches[0]))
  np.testing.assert_allclose(float(eval_sharded[0]), float(eval_one[0]), rtol=1e-5)
  np.testing.assert_allclose(sharded.train(batches), one.train(batches), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               sharded.params(), one.params())


def test_dry_run_prints_and_trains_nothing(tmp_path, capsys):
  workdir = str(tmp_path / 'never')
  row = loop.run(tiny_config(**{'mesh.data': -1, 'dry_run': True}), workdir)
  out = capsys.readouterr().out
  assert '"dry_run": true' in out
  assert 'mesh: data=8 x fsdp=1 x context=1 x tensor=1 over 8 devices' in out
  assert f"parameters: {row['params']:,}" in out and row['params'] > 0
  assert 'train step compiled memory per device:' in out
  assert row['perf/compiled_memory_bytes'] > 0
  assert not os.path.exists(workdir)
