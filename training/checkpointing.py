"""A run's checkpoints: where it starts from (resume, init_from, fresh), what it saves and when
a save is allowed.

Guarantees (each one is a test in tests/test_trust_checkpoints.py):
  * Finite or nothing: a step is saved only once its loss, gradient norm and parameter norm
    are known finite (or its update was skipped under optimizer.skip_nonfinite), so the
    rotation (checkpoint.keep) only ever deletes older finite steps.
  * Integrity: every array and data-state file is checksummed at save and verified on restore
    (checkpoint.verify); a step that fails is reported with a WARNING naming the file and the
    run falls back to the previous intact step. Steps set aside (corrupted, or newer than an
    explicit resume_step) move to `workdir/checkpoints_set_aside/`, never deleted.
  * Workdirs: resume='auto' (default) continues the newest intact step or starts fresh and
    says so; 'none' refuses a workdir that already holds checkpoints; a path continues another
    run's checkpoints in an empty workdir. A finished workdir re-run exits at its last step.
  * Changed config on resume: every changed key is logged; the learning-rate schedule keeps
    the checkpoint's length (optimizer.decay_steps, see training/optimizer.py); a change of
    seq_len, batch_size, seed or data.* remaps the data position instead of restoring it.
"""

import copy
import dataclasses
import datetime
import logging
import math
import os
import shutil
from typing import Any

import jax
import ml_collections

from checkpoint import metadata as ckpt_metadata
from checkpoint import universal
from checkpoint.convert import resolve_src
from checkpoint.layout import CheckpointMismatch
from checkpoint.manager import Checkpointer, CheckpointError
from training import data as data_lib
from training.hybrid import data as hybrid_data
from training.safety import run_files
from training.safety.errors import EXIT_NON_FINITE, UserError
from training.data import position

log = logging.getLogger('loomax')

SET_ASIDE = 'checkpoints_set_aside'
# Keys whose change makes the saved data-iterator state describe another pipeline.
_DATA_KEYS = ('seq_len', 'batch_size', 'seed')
# Keys that say how to start, not what is trained: never reported as changes.
_START_KEYS = ('resume', 'resume_step', 'init_from', 'progress')


class NonFiniteLoss(RuntimeError):
  """A step's loss, gradient or parameters went non-finite; nothing non-finite is saved.
  train.py prints the message as one line and exits with `exit_status`."""
  exit_status = EXIT_NON_FINITE


def open_checkpointer(config, workdir: str) -> Checkpointer:
  ck = config.checkpoint
  return Checkpointer(os.path.join(workdir, 'checkpoints'), keep=ck.keep,
                      keep_every=ck.keep_every, async_save=ck.async_save,
                      verify=ck.get('verify', True))


@dataclasses.dataclass
class Start:
  """Where a run starts: 'fresh', 'resume' (a whole train state) or 'init' (params only)."""
  mode: str
  source: Checkpointer | None = None
  own: bool = False  # the source is this workdir's own checkpoints directory


def plan_start(config, ckpt: Checkpointer) -> Start:
  """Validates resume / init_from against the workdir; raises with the key to change."""
  resume = config.resume or 'none'
  init_from = config.get('init_from', '')
  verify = config.checkpoint.get('verify', True)
  own = ckpt.all_steps()
  if resume == 'none' and own:
    raise UserError(f"resume='none' but {ckpt.directory} already holds checkpoints (steps "
                    f"{own}); a fresh start never overwrites them: pass --config.resume=auto "
                    'to continue them, or use another --workdir')
  if resume not in ('none', 'auto'):
    if own:
      raise UserError(f'resume={resume!r} but {ckpt.directory} already holds checkpoints '
                      f'(steps {own}); pass --config.resume=auto to continue those, or use '
                      'an empty --workdir')
    source = Checkpointer(resolve_src(resume), read_only=True, verify=verify)
    if not source.all_steps():
      raise UserError(f'resume={resume!r} holds no checkpoint')
    return Start('resume', source)
  if resume == 'auto' and own:
    if init_from:
      log.warning('init_from=%r ignored: continuing this workdir\'s own checkpoints (steps %s)',
                  init_from, own)
    return Start('resume', ckpt, own=True)
  if config.get('resume_step', -1) >= 0:
    raise UserError(f'resume_step={config.resume_step} but there is no checkpoint to resume '
                    f'({ckpt.directory} is empty and resume={resume!r})')
  if init_from:
    return Start('init', Checkpointer(resolve_src(init_from), read_only=True, verify=verify))
  if resume == 'auto':
    log.info('resume=auto: no checkpoint in %s; starting fresh', ckpt.directory)
  return Start('fresh')


def _newest_meta(source: Checkpointer) -> dict | None:
  for step in sorted(source.all_steps(), reverse=True):
    try:
      return source.read_meta(step)
    except CheckpointError:
      continue
  return None


def resolve_config(config, start: Start) -> ml_collections.ConfigDict:
  """A copy of `config` with optimizer.decay_steps made explicit: the resumed checkpoint's
  schedule length when it is 0 (so a changed `steps` keeps the curve), else `steps`."""
  config = copy.deepcopy(config)
  opt = config.optimizer
  if opt.get('decay_steps', 0) > 0:
    return config
  length = config.steps
  meta = _newest_meta(start.source) if start.mode == 'resume' else None
  if meta is not None:
    saved = meta['config']
    length = int(saved.get('optimizer', {}).get('decay_steps', 0) or saved['steps'])
    if length != config.steps:
      log.warning('optimizer.decay_steps=0: keeping the checkpoint\'s schedule length %d '
                  '(steps is now %d); set optimizer.decay_steps to change the curve',
                  length, config.steps)
  opt.decay_steps = int(length)
  return config


def _set_aside(workdir: str, ckpt: Checkpointer, steps: list[int], why: str) -> None:
  """Moves step directories out of the rotation (kept for inspection, never deleted)."""
  if not steps:
    return
  if jax.process_index() == 0:
    dest_root = os.path.join(workdir, SET_ASIDE)
    os.makedirs(dest_root, exist_ok=True)
    for step in steps:
      dest = os.path.join(dest_root, str(step))
      k = 1
      while os.path.exists(dest):
        dest, k = os.path.join(dest_root, f'{step}.{k}'), k + 1
      shutil.move(ckpt.step_dir(step), dest)
      log.warning('moved step %d (%s) to %s', step, why, dest)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('loomax_set_aside')
  ckpt.manager.reload()


def _restore_first_intact(source: Checkpointer, config, read):
  """(step, read(step)) for the explicit resume_step, or the newest step `read` accepts;
  corrupted steps are reported and skipped. Returns the steps skipped too."""
  steps = sorted(source.all_steps(), reverse=True)
  explicit = config.get('resume_step', -1)
  if explicit >= 0:
    if explicit not in steps:
      raise CheckpointError(f'resume_step={explicit}: {source.directory} holds steps '
                            f'{sorted(steps)}')
    return explicit, read(explicit), []
  bad = []
  for step in steps:
    try:
      return step, read(step), bad
    except CheckpointMismatch:
      raise  # the config does not fit: an older step would not fit either
    except CheckpointError as e:
      log.warning('%s; falling back to the previous checkpoint', e)
      bad.append(step)
  raise CheckpointError(f'{source.directory}: no intact checkpoint among steps {sorted(steps)} '
                        '(see the warnings above); checkpoint.verify=False loads one anyway '
                        '(resume_step=N picks which)')


def restore_or_init(config, program, start: Start, workdir: str, train_iter):
  """(state, train iterator, {event row for metrics.jsonl})."""
  if start.mode == 'fresh':
    return program.init_state(), train_iter, {'mode': 'fresh'}
  source = start.source
  if start.mode == 'init':
    step, (params, _), _ = _restore_first_intact(
        source, config, lambda s: universal.restore_params(source, s, config, program.setup,
                                                          program.mesh))
    state = program.init_state()
    fresh = ckpt_metadata.flatten(state.params)
    state = state.replace(params=ckpt_metadata.unflatten_like(
        {p: params['params/' + p] for p in fresh}, state.params))
    log.info('initialised the parameters from %s step %d (fresh optimizer)', source.directory,
             step)
    log.warning('init_from carries parameters only, no data-iterator state: the data stream '
                'starts from its beginning')
    return state, train_iter, {'mode': 'init_from', 'from': source.directory,
                               'from_step': step}

  def read(s):
    return universal.restore_state(source, s, config, program.setup, program.mesh)

  step, (state, meta, data_states), bad = _restore_first_intact(source, config, read)
  if start.own:
    _set_aside(workdir, source, bad, 'failed verification')
    newer = [s for s in source.all_steps() if s > step]
    _set_aside(workdir, source, newer, f'newer than resume_step={step}')
  changes = universal.config_changes(meta['config'], config, ignore=_START_KEYS)
  if changes:
    log.warning('config changed since the checkpoint: %s',
                '; '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changes.items()))
  train_iter, how = _resume_data(config, data_states, changes, train_iter)
  log.info('resumed from %s at step %d (written on mesh %s by %d process(es); data %s)',
           source.directory, step, meta['written_by']['mesh'],
           meta['written_by']['process_count'], how)
  return state, train_iter, {'mode': 'resume', 'from': source.directory, 'from_step': step,
                             'data': how.split(' ')[0] if data_states else 'fresh',
                             'changed': sorted(changes)}


def _resume_data(config, data_states, changes, train_iter):
  pid, nproc = jax.process_index(), jax.process_count()
  data_changed = [k for k in changes if k in _DATA_KEYS or k.startswith('data.')]
  if not data_states:
    log.warning('the checkpoint holds no data-iterator state (written without one, e.g. by '
                'convert_checkpoint --params-only or an older loomax): the data stream starts '
                'afresh from its beginning, so documents already trained on are read again')
    return train_iter, 'not saved: starting the data stream afresh'
  if config.parallelism.hybrid_dp.enabled:
    data_changed = hybrid_data.stream_changes(config, changes)
    if data_changed:
      raise UserError(f'{", ".join(data_changed)} changed since the checkpoint: the hybrid '
                      'data parallel document stream can only resume unchanged')
    train_iter.set_state(data_states[pid])  # every process reads it all
    return train_iter, 'exact (hybrid data parallel document stream)'
  if data_changed:
    start = position.resume_point(data_states)
    it = data_lib.make_train_iterator(config, process_index=pid, process_count=nproc,
                                      start=start)
    return it, (f'remapped to global position {start} because {", ".join(data_changed)} '
                'changed (no document skipped; documents in flight at the checkpoint are '
                'read again)')
  return data_lib.resume_train_iterator(config, data_states, process_index=pid,
                                        process_count=nproc)


def mark_run_start(workdir: str, start_step: int, info: dict[str, Any]) -> None:
  """One marker row in metrics.jsonl before a run's rows, so two runs never mix unmarked."""
  if jax.process_index() != 0:
    return
  row = {'event': 'run_start', 'step': start_step,
         'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
         **info}
  os.makedirs(workdir, exist_ok=True)
  run_files.append_row(workdir, row)  # repairs a torn last line first


def is_finite_step(metrics: dict[str, float]) -> bool:
  """Whether the state after a step may be saved: its update was finite or skipped."""
  if not math.isfinite(metrics.get('param_norm', 0.0)):
    return False
  if metrics.get('skipped', 0):
    return True
  return all(math.isfinite(metrics.get(k, 0.0)) for k in ('loss', 'grad_norm'))


class Saver:
  """Saves the train state with its data position; refuses non-finite or already-saved steps."""

  def __init__(self, ckpt: Checkpointer, meta: dict[str, Any]):
    self.ckpt, self.meta = ckpt, meta
    self.last_good = ckpt.latest_step()  # every step on disk was finite when saved

  def describe_last_good(self) -> str:
    if self.last_good is None:
      return 'no checkpoint saved yet'
    return f'last good checkpoint: step {self.last_good} in {self.ckpt.directory}'

  def save(self, step: int, state, data_state: dict, finite: bool, *, force: bool = False):
    if not finite:
      log.warning('step %d is not finite: not saving it (%s)', step, self.describe_last_good())
      return False
    if step in self.ckpt.all_steps():
      return False  # already on disk (a re-run into a finished workdir)
    saved = universal.save_state(self.ckpt, step, state, self.meta,
                                 {jax.process_index(): data_state}, force=force)
    if saved:
      self.last_good = step
    return saved
