"""The checkpoint converter: mesh/layout round trips are bit-identical, options do what they say,
the source is never modified, and bad input fails by name with nothing written."""

import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from checkpoint import convert, metadata, universal
from training.program import build_program
from checkpoint.layout import CheckpointMismatch
from checkpoint.manager import Checkpointer, CheckpointError
from tests.helpers import Trainer, random_batch, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH_A = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.context': 2}


def target_setup(config, mesh):
  return build_program(config, mesh).setup


def save_trained(directory, config, steps=2):
  t = Trainer(config)
  t.train([random_batch(config, seed=s) for s in range(steps)])
  ckpt = Checkpointer(directory, async_save=False)
  meta = metadata.describe(config, metadata.state_arrays(t.program.setup), t.mesh)
  universal.save_state(ckpt, steps, t.state, meta, None)
  ckpt.close()
  return t


def read_all(directory, step=None):
  """Every array of a checkpoint as numpy, by path, and its metadata."""
  ckpt = Checkpointer(directory, read_only=True)
  step = ckpt.latest_step() if step is None else step
  meta = ckpt.read_meta(step)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  targets = {p: jax.ShapeDtypeStruct(i.shape, i.dtype, sharding=one)
             for p, i in metadata.arrays_of(meta).items()}
  return {p: np.asarray(x) for p, x in ckpt.read_arrays(step, targets).items()}, meta


def tree_hash(directory):
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(directory)):
    dirs.sort()
    for f in sorted(files):
      path = os.path.join(root, f)
      h.update(path.encode())
      h.update(open(path, 'rb').read())
  return h.hexdigest()


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('src') / 'checkpoints')
  save_trained(d, tiny_config(**MESH_A))
  return d


def test_round_trip_is_bit_identical_and_layouts_match(source, tmp_path):
  before = tree_hash(source)
  b, a2 = str(tmp_path / 'b'), str(tmp_path / 'a2')
  convert.convert(target_setup, convert.Request(source, b, mesh={'fsdp': 8}, layout='scan'),
                  out=lambda s: None,
                  progress=False)
  convert.convert(target_setup, convert.Request(b, a2, mesh={'data': 2, 'fsdp': 2, 'context': 2},
                                  layout='unrolled'), out=lambda s: None, progress=False)
  orig, meta_a = read_all(source)
  back, meta_a2 = read_all(a2)
  assert sorted(orig) == sorted(back)
  for p in orig:
    assert orig[p].dtype == back[p].dtype and np.array_equal(orig[p], back[p]), p
  assert meta_a['arrays'] == meta_a2['arrays'] and meta_a2['layout'] == 'unrolled'
  # B is the same state stacked on a leading 'layers' axis: parameters AND Adam moments.
  mid, meta_b = read_all(b)
  assert meta_b['layout'] == 'scan' and meta_b['config']['mesh']['fsdp'] == 8
  for prefix in ('params/blocks', 'opt_state/adam/mu/blocks', 'opt_state/adam/nu/blocks'):
    for leaf in ('attn/wq', 'mlp/w_down', 'attn_norm/scale'):
      stacked = mid[f'{prefix}/{leaf}']
      assert meta_b['arrays'][f'{prefix}/{leaf}']['axes'][0] == 'layers'
      for i in range(2):
        np.testing.assert_array_equal(stacked[i], orig[f'{prefix}/{i}/{leaf}'])
  assert tree_hash(source) == before, 'the source was modified'


def test_params_only_dtype_dry_run_and_refusals(source, tmp_path):
  before = tree_hash(source)
  lines = []
  dry = convert.convert(target_setup, convert.Request(source, str(tmp_path / 'x'), mesh={'fsdp': 4},
                                        params_only=True, dtype='bfloat16', dry_run=True),
                        out=lines.append, progress=False)
  assert not os.path.exists(tmp_path / 'x')
  assert 'bytes per device' in lines[-1] and 'opt_state' not in '\n'.join(lines)
  # 4-way fsdp splits every parameter's embed dimension: a quarter per device, plus the
  # replicated step (int32) and rng (2 x uint32).
  assert dry['per_device_bytes'] == (dry['bytes'] - 12) // 4 + 12

  dst = str(tmp_path / 'p')
  convert.convert(target_setup, convert.Request(source, dst, params_only=True, dtype='bfloat16'),
                  out=lambda s: None, progress=False)
  orig, _ = read_all(source)
  got, meta = read_all(dst)
  assert not [p for p in got if p.startswith('opt_state')]
  assert meta['items'] == ['params', 'train'] and meta['config']['model']['param_dtype'] == \
      'bfloat16'
  for p, x in got.items():
    if p.startswith('params/'):
      assert x.dtype.name == 'bfloat16'
      np.testing.assert_array_equal(x, orig[p].astype(x.dtype))
  with pytest.raises(FileExistsError, match='refusing to overwrite'):
    convert.convert(target_setup, convert.Request(source, dst), out=lambda s: None, progress=False)
  # A parameters-only checkpoint cannot resume training, and says why.
  c = tiny_config(**MESH_A)
  t = Trainer(c)
  with pytest.raises(CheckpointError, match='params-only'):
    universal.restore_state(Checkpointer(dst, read_only=True), 2, c, t.program.setup, t.mesh)
  assert tree_hash(source) == before


def test_export_npz(source, tmp_path):
  dst = str(tmp_path / 'model.npz')
  convert.convert(target_setup, convert.Request(source, dst, export='npz', layout='scan'),
                  out=lambda s: None,
                  progress=False)
  orig, _ = read_all(source)
  npz = np.load(dst)
  side = json.load(open(dst + '.json'))
  assert sorted(npz.files) == sorted(side['arrays']) and side['layout'] == 'scan'
  np.testing.assert_array_equal(npz['embed/table'], orig['params/embed/table'])
  np.testing.assert_array_equal(npz['blocks/attn/wk'][1], orig['params/blocks/1/attn/wk'])
  assert side['arrays']['blocks/attn/wk']['axes'] == ['layers', 'embed', 'kv_heads', None]


# Orbax leaves a pending read coroutine behind when a corrupted array fails to decode.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_bad_input_fails_by_name_and_writes_nothing(source, tmp_path):
  # A target mesh that does not divide a dimension: heads=4 over tensor=8 (kv heads would be
  # replicated, query heads cannot be).
  with pytest.raises(ValueError, match=r"attn.*w[qo].*not divisible by mesh tensor=8"):
    convert.convert(target_setup,
                    convert.Request(source, str(tmp_path / 'm'), mesh={'tensor': 8}),
                    out=lambda s: None, progress=False)
  assert not os.path.exists(tmp_path / 'm')
  # A checkpoint of a different model config.
  c = tiny_config(**MESH_A, **{'model.mlp_dim': 96})
  t = Trainer(c)
  with pytest.raises(CheckpointMismatch, match=r'mlp/w_down: checkpoint shape \(128, 64\)'):
    universal.restore_state(Checkpointer(source, read_only=True), 2, c, t.program.setup, t.mesh)
  # A corrupted array file: the error names the array; a truncated checkpoint names the item.
  broken = tmp_path / 'broken'
  os.system(f'cp -r {os.path.dirname(source)} {broken}')
  data_dir = broken / 'checkpoints' / '2' / 'opt_state' / 'ocdbt.process_0' / 'd'
  for f in data_dir.iterdir():
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
  c = tiny_config(**MESH_A)
  t = Trainer(c)
  with pytest.raises(CheckpointError, match=r'opt_state: array opt_state/.* could not be read'):
    universal.restore_state(Checkpointer(str(broken / 'checkpoints'), read_only=True), 2, c,
                            t.program.setup, t.mesh)
  os.system(f'rm -rf {broken}/checkpoints/2/params')
  with pytest.raises(CheckpointError, match=r'2/params: missing'):
    universal.restore_state(Checkpointer(str(broken / 'checkpoints'), read_only=True), 2, c,
                            t.program.setup, t.mesh)


def test_cli(source, tmp_path):
  env = {**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, 'scripts/convert_checkpoint.py', '--src',
                        os.path.dirname(source), '--dst', str(tmp_path / 'c'), '--mesh',
                        'data=2,fsdp=4', '--layout', 'scan', '--no-progress'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "'fsdp': 4" in out.stdout and 'wrote' in out.stdout
  assert Checkpointer(str(tmp_path / 'c'), read_only=True).latest_step() == 2
  again = subprocess.run([sys.executable, 'scripts/convert_checkpoint.py', '--src', source,
                          '--dst', str(tmp_path / 'c'), '--dry-run', '--mesh', 'fsdp=3'],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert again.returncode == 2 and 'not divisible by mesh fsdp=3' in again.stderr
  # The README's export command on a 1-device host, for a checkpoint written on 8 devices.
  npz = str(tmp_path / 'model.npz')
  export = subprocess.run([sys.executable, 'scripts/convert_checkpoint.py', '--src', source,
                           '--dst', npz, '--export', 'npz', '--no-progress'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  assert export.returncode == 0, export.stderr[-2000:]
  orig, _ = read_all(source)
  np.testing.assert_array_equal(np.load(npz)['embed/table'], orig['params/embed/table'])
  # A malformed --mesh is one line on stderr, no traceback.
  bad = subprocess.run([sys.executable, 'scripts/convert_checkpoint.py', '--src', source,
                        '--dst', str(tmp_path / 'm'), '--mesh', 'data:2'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and 'Traceback' not in bad.stderr
  assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "--mesh 'data:2'" in bad.stderr
  assert not os.path.exists(tmp_path / 'm')


def test_dst_inside_src_is_refused(source):
  workdir = os.path.dirname(source)
  before = tree_hash(workdir)
  for src, dst in ((source, os.path.join(source, '99')),          # a step inside checkpoints/
                   (workdir, os.path.join(source, '5')),          # src given as the workdir
                   (workdir, os.path.join(workdir, 'copy'))):
    with pytest.raises(ValueError, match='lies inside --src'):
      convert.convert(target_setup, convert.Request(src, dst), out=lambda s: None,
                      progress=False)
    assert not os.path.exists(dst)
  assert tree_hash(workdir) == before, 'the source was modified'
  for text in ('data=2,data=2', 'data=0', 'foo=2', 'data', ','):
    with pytest.raises(ValueError, match='--mesh'):
      convert.parse_mesh(text)
  assert convert.parse_mesh('data=2, fsdp=-1') == {'data': 2, 'fsdp': -1}
