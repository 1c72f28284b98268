"""Length curriculum: `data.length_schedule` trains in stages of growing sequence length, as
long-context recipes do (Llama 3's staged extension; YaRN's fine-tuning; ProLong).

    data.length_schedule = '0:128,200:256,400:512'     # start_step:seq_len[:batch_size], ...

Stage i covers the steps after `start_i` steps are done, up to `start_{i+1}`. A stage without
a batch size keeps the run's tokens per step (batch_size x seq_len of the config) constant.

The data stream carries over at a stage boundary: the next stage's pipeline (re-packed at its
length) begins at the previous stage's watermark (training/data/position.py) and reads as
empty every document the previous stage emitted completely, so no document is skipped and no
completely emitted document is read again. The documents in flight at the boundary (some of
their pieces were emitted, the rest sat in the packing bins or the piece-shuffle window) are
read again whole at the new length: their emitted pieces are seen twice. Their number is
bounded by data.num_packing_bins plus data.shuffle_window and counted in the iterator state
('repeated'); with documents much longer than a stage, that can be most of the stage's tokens.
Piece-exact carry-over would need the position tracker to record which pieces were emitted.
Task sources (passkey, mqar, synthetic) have no buffers: exact, nothing repeated.

The iterator state (what checkpoints store) records the stage, the step count and where the
stage's stream began, so a resume lands in the right stage with the exact batches.
"""

import dataclasses
from typing import Any

import ml_collections

from training.data import pipeline, position

KEY = 'data.length_schedule'


@dataclasses.dataclass(frozen=True)
class Stage:
  start: int         # steps done before the stage's first step
  seq_len: int
  batch_size: int    # global rows per step


def parse(config) -> list[Stage]:
  """The stages of `data.length_schedule` ([] when unset); one-line errors name the key."""
  text = str(config.data.length_schedule or '').strip()
  if not text:
    return []
  tokens = config.batch_size * config.seq_len
  stages = []
  for item in text.split(','):
    parts = item.strip().split(':')
    try:
      nums = [int(p) for p in parts]
    except ValueError:
      nums = []
    if len(nums) not in (2, 3) or min(nums[1:]) <= 0 or nums[0] < 0:
      raise ValueError(f'{KEY}={text!r}: stage {item.strip()!r} is not '
                       'start_step:seq_len[:batch_size] with positive seq_len and batch_size')
    start, length = nums[:2]
    if len(nums) == 3:
      batch = nums[2]
    elif tokens % length:
      raise ValueError(f'{KEY}={text!r}: stage {item.strip()!r} cannot keep batch_size x '
                       f'seq_len = {tokens} tokens per step ({tokens} % {length} != 0); give '
                       'it a batch size (start:seq_len:batch_size)')
    else:
      batch = tokens // length
    stages.append(Stage(start, length, batch))
  if stages[0].start != 0 or any(b.start <= a.start for a, b in zip(stages, stages[1:])):
    raise ValueError(f'{KEY}={text!r}: stages must start at step 0 and at increasing steps')
  return stages


def stage_index(stages: list[Stage], steps_done: int) -> int:
  """The stage that trains the step after `steps_done` steps."""
  return max(i for i, s in enumerate(stages) if s.start <= steps_done)


def stage_config(config, stage: Stage) -> ml_collections.ConfigDict:
  """The run's config with the stage's seq_len and batch_size (schedule kept)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.seq_len, c.batch_size = stage.seq_len, stage.batch_size
  return c


def _plain(config) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.length_schedule = ''
  return c


class CurriculumIterator:
  """Batches of each stage in turn; get_state/set_state as grain's (checkpointed exactly)."""

  def __init__(self, config, *, process_index: int = 0, process_count: int = 1,
               start: int = 0, _state: dict[str, Any] | None = None):
    self.stages = parse(config)
    self._config = _plain(config)
    self._where = dict(process_index=process_index, process_count=process_count)
    st = _state or {'step': 0, 'stage': 0, 'start': start, 'skip': [], 'repeated': 0,
                    'boundaries': []}
    self._state = {k: (list(v) if isinstance(v, list) else v) for k, v in st.items()}
    self._it = self._open()

  def _open(self):
    st = self._state
    c = stage_config(self._config, self.stages[st['stage']])
    return pipeline.make_train_iterator(c, **self._where, start=st['start'],
                                        skip=frozenset(st['skip']))

  @property
  def stage(self) -> Stage:
    return self.stages[self._state['stage']]

  def __iter__(self):
    return self

  def __next__(self):
    i = stage_index(self.stages, self._state['step'])
    if i != self._state['stage']:
      self._switch(i)
    batch = next(self._it)
    self._state['step'] += 1
    return batch

  def _switch(self, i: int) -> None:
    """Re-pack from the current stage's watermark at stage i's length."""
    inner = self._it.get_state()
    pos, pending = inner['position'], inner['pending']
    w, n = pos['watermark'], pos['process_count']
    done = [int(j) - w for j, (emitted, total) in pending.items() if emitted >= total]
    partial = sum(1 for emitted, total in pending.values() if 0 < emitted < total)
    skip = sorted({j - w for j in self._state['skip'] if j >= w} | set(done))
    st = self._state
    st['boundaries'].append({'step': st['step'], 'stage': i, 'start': pos['start'] + n * w,
                             'repeated': partial})
    st.update(stage=i, start=pos['start'] + n * w, skip=skip, repeated=st['repeated'] + partial)
    self._it = self._open()

  def position(self) -> dict[str, int]:
    return self._it.position()

  def get_state(self) -> dict[str, Any]:
    inner = self._it.get_state()
    return {'curriculum': {k: (list(v) if isinstance(v, list) else v)
                           for k, v in self._state.items()},
            'position': inner['position'], 'inner': inner}

  def set_state(self, state: dict[str, Any]) -> None:
    self._state = dict(state['curriculum'])
    self._state['skip'] = list(self._state['skip'])
    self._state['boundaries'] = list(self._state['boundaries'])
    self._it = self._open()
    self._it.set_state(state['inner'])


def resume(config, saved: dict[int, dict], *, process_index: int = 0,
           process_count: int = 1) -> tuple[CurriculumIterator, str]:
  """The curriculum iterator continued from per-process states (as resume_train_iterator)."""
  mine = saved.get(process_index)
  if mine is not None and 'curriculum' in mine and \
      mine['position']['process_count'] == process_count:
    it = CurriculumIterator(config, process_index=process_index, process_count=process_count)
    it.set_state(mine)
    return it, f'exact (length schedule stage {it._state["stage"]}, seq_len {it.stage.seq_len})'
  # Another process count: restart the saved stage at the lowest global position not emitted
  # completely (documents in flight are read again), as the plain pipeline does.
  step = max(s.get('curriculum', {}).get('step', 0) for s in saved.values())
  stages = parse(config)
  G = position.resume_point(saved)
  it = CurriculumIterator(config, process_index=process_index, process_count=process_count,
                          _state={'step': step, 'stage': stage_index(stages, step), 'start': G,
                                  'skip': [], 'repeated': 0, 'boundaries': []})
  return it, f'remapped to global position {G} in stage {it._state["stage"]}'


def check(config, mesh, context_check) -> list[Stage]:
  """Every stage's shape checked at start-up by `context_check(stage_config)` (e.g. the
  context axis dividing each length); returns the stages."""
  stages = parse(config)
  for s in stages:
    try:
      context_check(stage_config(config, s), mesh)
    except ValueError as e:
      raise ValueError(f'{KEY} stage {s.start}:{s.seq_len}:{s.batch_size}: {e}') from None
  return stages
