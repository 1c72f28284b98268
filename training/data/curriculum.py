"""Length curriculum: `data.length_schedule` trains in stages of growing sequence length, as
long-context recipes do (Llama 3's staged extension; YaRN's fine-tuning; ProLong).

    data.length_schedule = '0:128,200:256,400:512'     # start_step:seq_len[:batch_size], ...

Stage i covers the steps after `start_i` steps are done, up to `start_{i+1}`. A stage without
a batch size keeps the run's tokens per step (batch_size x seq_len of the config) constant.

The data stream carries over exactly at a stage boundary: the next stage's pipeline (re-packed
at its length) begins at the previous stage's watermark (training/data/position.py), reads as
empty every document the previous stage emitted completely, and reads each document in flight
(some of its pieces emitted, the rest in the packing bins or the piece-shuffle window) only in
the token ranges of its pieces not emitted yet (the tracker records which were), cut at the
new length. So no target token is skipped or trained twice; pieces of a carried document
start where the previous stage's pieces ended. The count of carried documents is in the
iterator state ('carried'). Task sources (passkey, mqar, synthetic) have no buffers.

The iterator state (what checkpoints store) records the stage, the step count and where the
stage's stream began, so a resume lands in the right stage with the exact batches.
"""

import dataclasses
import json
from typing import Any

import ml_collections

from training.data import packing, pipeline, position

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
    st = _state or {'step': 0, 'stage': 0, 'start': start, 'skip': [], 'trim': {},
                    'carried': 0, 'boundaries': []}
    self._state = json.loads(json.dumps(st))   # a private copy
    self._it = self._open()

  def _open(self):
    st = self._state
    c = stage_config(self._config, self.stages[st['stage']])
    return pipeline.make_train_iterator(c, **self._where, start=st['start'],
                                        skip=frozenset(st['skip']),
                                        trim={int(j): r for j, r in st['trim'].items()})

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
    """Re-pack from the current stage's watermark at stage i's length, without what the
    current stage emitted."""
    inner = self._it.get_state()
    pos, pending, emitted = inner['position'], inner['pending'], inner.get('emitted', {})
    w, n = pos['watermark'], pos['process_count']
    st = self._state
    old_trim = {int(j): r for j, r in st['trim'].items()}
    skip = {j - w for j in st['skip'] if j >= w}
    trim = {j - w: r for j, r in old_trim.items() if j >= w and str(j) not in pending}
    length, carried = None, 0
    for key, (done, total) in pending.items():
      j = int(key)
      if done >= total:
        skip.add(j - w)
        continue
      if length is None:
        length = pipeline.document_length(self._config, **self._where, start=pos['start'])
      sent = set(emitted.get(key, []))
      spans = packing.piece_spans(length(j), self.stage.seq_len, old_trim.get(j))
      ranges: list[list[int]] = []
      for k, (s, e) in enumerate(spans):
        if k in sent:
          continue
        if ranges and ranges[-1][1] - 1 == s:   # the next piece: extend the range
          ranges[-1][1] = e
        else:
          ranges.append([s, e])
      trim[j - w] = ranges
      carried += bool(sent)
    st['boundaries'].append({'step': st['step'], 'stage': i, 'start': pos['start'] + n * w,
                             'carried': carried})
    st.update(stage=i, start=pos['start'] + n * w, skip=sorted(skip),
              trim={str(j): r for j, r in sorted(trim.items())}, carried=st['carried'] + carried)
    self._it = self._open()

  def position(self) -> dict[str, int]:
    return self._it.position()

  def get_state(self) -> dict[str, Any]:
    inner = self._it.get_state()
    return {'curriculum': json.loads(json.dumps(self._state)),
            'position': inner['position'], 'inner': inner}

  def set_state(self, state: dict[str, Any]) -> None:
    self._state = json.loads(json.dumps(state['curriculum']))
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
                                  'skip': [], 'trim': {}, 'carried': 0, 'boundaries': []})
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
