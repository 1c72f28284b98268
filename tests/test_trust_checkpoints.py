"""Checkpoints a run can trust: nothing non-finite is saved, corruption is caught and skipped,
a changed config resumes honestly, and a workdir is never silently reused (issue 13)."""

import glob
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from checkpoint import convert, layout, metadata, universal
from checkpoint.manager import Checkpointer, CheckpointError
from parallelism import mesh as mesh_lib
from tests.helpers import tiny_config
from training import checkpointing, loop
from training.optimizer import learning_rate_schedule
from training.program import build_program

COMMON = {'data.source': 'synthetic', 'eval_every': 0, 'eval_batches': 1, 'log_every': 1}
# A long warm-up: under the old rule (warm-up = min(warmup_steps, steps)) the curve of a
# 4-step run and of its 6-step continuation differ at every step.
BASE = {**COMMON, 'steps': 4, 'checkpoint.every': 2, 'optimizer.warmup_steps': 100}
NAN = {**COMMON, 'steps': 10, 'optimizer.lr': 1e6, 'optimizer.clip_norm': 0.0,
       'checkpoint.every': 1, 'checkpoint.keep': 3}


def cfg(**overrides):
  return tiny_config(**{**BASE, **overrides})


def rows(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]


def ckpts(workdir):
  return Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)


def read_all(directory, step, prefix=''):
  ck = Checkpointer(directory, read_only=True)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  targets = {p: jax.ShapeDtypeStruct(i.shape, i.dtype, sharding=one)
             for p, i in metadata.arrays_of(ck.read_meta(step)).items() if p.startswith(prefix)}
  return {p: np.asarray(x) for p, x in ck.read_arrays(step, targets).items()}


def all_finite(workdir):
  ck = ckpts(workdir)
  return {s: all(np.isfinite(x).all() for x in read_all(ck.directory, s).values())
          for s in ck.all_steps()}


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  """A finished 4-step run with checkpoints at steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp('base'))
  loop.run(cfg(), workdir)
  return workdir


def copy_of(base, tmp_path):
  shutil.copytree(base, tmp_path / 'w')
  return str(tmp_path / 'w')


def test_nan_is_never_saved_and_the_last_finite_step_survives_resume(tmp_path, caplog):
  workdir = str(tmp_path)
  with pytest.raises(loop.NonFiniteLoss, match=r'at step (\d+).*last good checkpoint: step'):
    loop.run(tiny_config(**NAN), workdir)
  first = all_finite(workdir)
  assert first and all(first.values()), first
  good = max(first)
  # The same command again (resume=auto): stops at the same step, deletes nothing finite.
  with caplog.at_level(logging.INFO, logger='loomax'), \
      pytest.raises(loop.NonFiniteLoss, match=f'last good checkpoint: step {good}'):
    loop.run(tiny_config(**NAN), workdir)
  assert all_finite(workdir) == first
  assert [r['event'] for r in rows(workdir) if 'event' in r] == ['run_start'] * 2


def test_skip_nonfinite_counts_and_keeps_the_state(tmp_path):
  workdir = str(tmp_path)
  row = loop.run(tiny_config(**{**NAN, 'steps': 6, 'optimizer.skip_nonfinite': True}), workdir)
  assert row['step'] == 6
  train = [r for r in rows(workdir) if 'train/loss' in r]
  skipped = [r['train/skipped_steps'] for r in train]
  assert skipped == sorted(skipped) and skipped[-1] >= 1, skipped  # cumulative, some skipped
  first_skip = train[[s > 0 for s in skipped].index(True)]['step']
  assert not np.isfinite(train[first_skip - 1]['train/grad_norm'])
  # The parameters after the last skipped step are those before the first one.
  ck = ckpts(workdir)
  assert 6 in ck.all_steps() and all(all_finite(workdir).values())
  if first_skip - 1 in ck.all_steps():
    before = read_all(ck.directory, first_skip - 1, 'params/')
    after = read_all(ck.directory, 6, 'params/')
    for p in before:
      np.testing.assert_array_equal(before[p], after[p], err_msg=p)


def flip_silently(workdir, step, count=400):
  """Inverts `count` bytes of the largest parameter data file where the result still decodes
  (Orbax stores chunks zstd-compressed, so some flips are decode errors instead): the silent
  corruption of issue 13. Returns the array that reads back changed."""
  directory = os.path.join(workdir, 'checkpoints')
  clean = read_all(directory, step, 'params/')
  f = max(glob.glob(f'{directory}/{step}/params/ocdbt.process_0/d/*'), key=os.path.getsize)
  original = open(f, 'rb').read()
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  targets = {p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one) for p, x in clean.items()}
  for at in range(len(original) // 2, len(original) - count, 997):
    data = bytearray(original)
    data[at:at + count] = bytes(b ^ 0xFF for b in data[at:at + count])
    open(f, 'wb').write(data)
    try:
      got = Checkpointer(directory, read_only=True, verify=False).read_arrays(step, targets)
    except CheckpointError:
      continue
    changed = [p for p in clean if not np.array_equal(np.asarray(got[p]), clean[p])]
    if changed:
      return changed[0]
  raise AssertionError('no flip decoded silently')


def test_bit_flip_falls_back_to_the_previous_step(base, tmp_path, caplog):
  workdir = copy_of(base, tmp_path)
  changed = flip_silently(workdir, 4)
  with caplog.at_level(logging.INFO, logger='loomax'):
    row = loop.run(cfg(), workdir)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(f'{workdir}/checkpoints/4/params: checksum mismatch in array {changed}'
             in w for w in warnings), warnings
  start = [r for r in rows(workdir) if r.get('event') == 'run_start'][-1]
  assert start['from_step'] == 2 and row['step'] == 4
  # The corrupted step is set aside (not deleted); steps 3-4 are retrained exactly.
  assert os.path.isdir(os.path.join(workdir, checkpointing.SET_ASIDE, '4'))
  want = {r['step']: r['train/loss'] for r in rows(base) if 'train/loss' in r}
  got = [r for r in rows(workdir) if 'train/loss' in r][-2:]
  np.testing.assert_allclose([r['train/loss'] for r in got], [want[3], want[4]], rtol=1e-5)
  assert ckpts(workdir).all_steps() == [2, 4]
  np.testing.assert_array_equal(  # the new step 4 verifies and equals the original
      read_all(os.path.join(workdir, 'checkpoints'), 4, 'params/')['params/embed/table'],
      read_all(os.path.join(base, 'checkpoints'), 4, 'params/')['params/embed/table'])
  # An unreadable data-state file is a read error; resume_step=4 insists on that step.
  data_file = glob.glob(f'{workdir}/checkpoints/4/data/process_0-of-1.json')[0]
  open(data_file, 'w').write('{"trunc')
  c = cfg(resume_step=4)
  program = build_program(c, mesh_lib.make_mesh(c.mesh))
  ck = checkpointing.open_checkpointer(c, workdir)
  with pytest.raises(CheckpointError, match='process_0-of-1.json: checksum mismatch'):
    checkpointing.restore_or_init(c, program, checkpointing.plan_start(c, ck), workdir, None)


def test_rerun_into_a_finished_workdir_exits_at_its_last_step(base, tmp_path):
  workdir = copy_of(base, tmp_path)
  before = open(os.path.join(workdir, 'metrics.jsonl')).read()
  row = loop.run(cfg(), workdir)
  assert row['step'] == 4
  after = rows(workdir)
  assert open(os.path.join(workdir, 'metrics.jsonl')).read().startswith(before)
  assert after[-1]['event'] == 'run_start' and after[-1]['from_step'] == 4  # nothing else added
  assert ckpts(workdir).all_steps() == [2, 4]
  # resume='none' refuses it; resume=<path> into it too; an empty workdir says it starts fresh.
  for resume in ('none', os.path.join(base, 'checkpoints')):
    with pytest.raises(ValueError, match='already holds checkpoints'):
      loop.run(cfg(resume=resume), workdir)


def test_auto_with_nothing_to_resume_says_so(tmp_path, caplog):
  ck = Checkpointer(str(tmp_path / 'checkpoints'))
  with caplog.at_level(logging.INFO, logger='loomax'):
    start = checkpointing.plan_start(cfg(), ck)
  assert start.mode == 'fresh'
  assert any('no checkpoint' in r.getMessage() for r in caplog.records)
  with pytest.raises(ValueError, match='resume_step=2'):
    checkpointing.plan_start(cfg(resume_step=2), ck)


def test_changed_steps_keep_the_lr_curve_and_batch_size_remaps_data(base, tmp_path, caplog):
  workdir = copy_of(base, tmp_path)
  with caplog.at_level(logging.INFO, logger='loomax'):
    loop.run(cfg(steps=6, batch_size=16), workdir)
  text = '\n'.join(r.getMessage() for r in caplog.records)
  assert "steps: 4 -> 6" in text and 'batch_size: 8 -> 16' in text
  assert 'remapped to global position 32' in text
  lr = {r['step']: r['train/lr'] for r in rows(workdir) if 'train/lr' in r}
  opt = cfg().optimizer
  for s in range(1, 7):  # one curve, from the first run's schedule: warm-up 100, length 4
    np.testing.assert_allclose(lr[s], float(learning_rate_schedule(opt, 4)(s - 1)), rtol=1e-6)
    np.testing.assert_allclose(lr[s], 3e-3 * (s - 1) / 100, rtol=1e-5)
  ck = ckpts(workdir)
  assert ck.read_meta(6)['config']['optimizer']['decay_steps'] == 4
  from training.data import position
  assert position.resume_point(ck.read_data(6)) == 4 * 8 + 2 * 16  # no row skipped or repeated


def test_changed_optimizer_settings_restore_the_moments(base):
  c = cfg(**{'optimizer.clip_norm': 0.0, 'optimizer.weight_decay': 0.0})
  program = build_program(c, mesh_lib.make_mesh(c.mesh))
  source = ckpts(base)
  state, _, _ = universal.restore_state(source, 4, c, program.setup, program.mesh)
  saved = read_all(source.directory, 4, 'opt_state/')
  got = metadata.flatten(state)
  assert saved and {p for p in got if p.startswith('opt_state/')} == set(saved)
  for p, x in saved.items():
    np.testing.assert_array_equal(np.asarray(got[p]), x, err_msg=p)
  # A real mismatch of the optimizer state names the optimizer keys that changed.
  err = universal._name_optimizer_keys(
      layout.CheckpointMismatch('opt_state/adam/mu/w: the model has this array'),
      {**source.read_meta(4)['config']}, cfg(**{'optimizer.b1': 0.5}))
  assert 'optimizer.b1: 0.9 -> 0.5' in str(err)


def test_version_1_optimizer_names_are_read():
  meta = {'universal_checkpoint_version': 1, 'arrays': {
      'opt_state/1/0/mu/w': {}, 'opt_state/1/0/count': {}, 'opt_state/1/2/count': {},
      'params/w': {}}}
  assert metadata.current_names(meta) == {'opt_state/1/0/mu/w': 'opt_state/adam/mu/w',
                                          'opt_state/1/0/count': 'opt_state/adam/count',
                                          'opt_state/1/2/count': 'opt_state/schedule/count'}


def test_init_from_loads_parameters_only(base, tmp_path):
  dst = str(tmp_path / 'params_only')
  c = cfg()
  convert.convert(lambda cc, m: build_program(cc, m).setup,
                  convert.Request(os.path.join(base, 'checkpoints'), dst, params_only=True),
                  out=lambda s: None, progress=False)
  ck = checkpointing.open_checkpointer(c, str(tmp_path / 'w'))
  start = checkpointing.plan_start(cfg(init_from=dst), ck)
  assert start.mode == 'init'
  program = build_program(c, mesh_lib.make_mesh(c.mesh))
  state, _, info = checkpointing.restore_or_init(c, program, start, str(tmp_path / 'w'), None)
  assert info['mode'] == 'init_from' and info['from_step'] == 4 and int(state.step) == 0
  want = read_all(os.path.join(base, 'checkpoints'), 4, 'params/')
  got = metadata.flatten(state)
  for p, x in want.items():
    np.testing.assert_array_equal(np.asarray(got[p]), x, err_msg=p)
  assert all(not np.asarray(x).any() for p, x in got.items() if p.startswith('opt_state/'))
  # A checkpoint in the workdir wins over init_from; a params-only checkpoint cannot resume.
  with pytest.raises(CheckpointError, match='init_from='):
    universal.restore_state(Checkpointer(dst, read_only=True), 4, c, program.setup,
                            program.mesh)


def test_a_non_finite_array_on_disk_is_refused(tmp_path):
  """Steps written before finite-only saves (or by hand) are not loaded either."""
  ck = Checkpointer(str(tmp_path), async_save=False)
  w = np.array([1.0, np.nan, 2.0], np.float32)
  ck.save(1, {'params/w': jax.numpy.asarray(w)},
          {'arrays': {'params/w': metadata.ArrayInfo((3,), 'float32', (None,)).to_json()}})
  ck.close()
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {'params/w': jax.ShapeDtypeStruct((3,), 'float32', sharding=one)}
  with pytest.raises(CheckpointError, match='params/w holds non-finite values'):
    Checkpointer(str(tmp_path), read_only=True).read_arrays(1, target)
  got = Checkpointer(str(tmp_path), read_only=True, verify=False).read_arrays(1, target)
  np.testing.assert_array_equal(np.asarray(got['params/w']), w)


def test_a_missing_data_state_is_a_damaged_step(base, tmp_path, caplog):
  """The newest step's data/ folder deleted: WARNING, set aside, resumed from the step before
  (not a silent restart of the data stream, issue 27)."""
  workdir = copy_of(base, tmp_path)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4', 'data'))
  with caplog.at_level(logging.WARNING, logger='loomax'):
    row = loop.run(cfg(), workdir)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(f'{workdir}/checkpoints/4/data: missing, but the metadata records the data state'
             in w for w in warnings), warnings
  start = [r for r in rows(workdir) if r.get('event') == 'run_start'][-1]
  assert start['from_step'] == 2 and start['data'] == 'exact' and row['step'] == 4
  assert os.path.isdir(os.path.join(workdir, checkpointing.SET_ASIDE, '4'))
  want = {r['step']: r['train/loss'] for r in rows(base) if 'train/loss' in r}
  got = [r for r in rows(workdir) if 'train/loss' in r][-2:]
  np.testing.assert_allclose([r['train/loss'] for r in got], [want[3], want[4]], rtol=1e-5)


def edit_meta(workdir, step, edit):
  path = os.path.join(workdir, 'checkpoints', str(step), 'meta', 'metadata')
  meta = json.load(open(path))
  edit(meta)
  json.dump(meta, open(path, 'w'))


def test_edited_metadata_is_caught_and_unverified_steps_say_so(base, tmp_path, caplog):
  workdir = copy_of(base, tmp_path)
  edit_meta(workdir, 4, lambda m: m['config']['model'].update(rope_theta=500.0))
  with pytest.raises(CheckpointError, match=r'4/meta: metadata checksum mismatch'):
    ckpts(workdir).read_meta(4)
  # A step written before checksums existed loads, with a WARNING that it is unverified.
  edit_meta(workdir, 2, lambda m: [m.pop('checksums'), m.pop('meta_checksum')])
  with caplog.at_level(logging.WARNING, logger='loomax'):
    assert ckpts(workdir).read_meta(2)['step'] == 2
  assert any('step 2' in r.getMessage() and 'loading it unverified' in r.getMessage()
             for r in caplog.records)


def test_a_refused_resume_leaves_config_json_untouched(base, tmp_path):
  workdir = copy_of(base, tmp_path)
  before = open(os.path.join(workdir, 'config.json')).read()
  with pytest.raises(layout.CheckpointMismatch):
    loop.run(cfg(**{'model.d_model': 32}), workdir)
  assert open(os.path.join(workdir, 'config.json')).read() == before
  assert not [f for f in os.listdir(workdir) if f.startswith('.config.json')]  # no temp left
