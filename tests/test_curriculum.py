"""Length curriculum (data.length_schedule): stages parse with one-line errors naming the key,
batches take each stage's shape at constant tokens per step, the stream carries over at stage
boundaries (exactly for task sources), a run killed in stage 2 and resumed equals the
uninterrupted run, each stage compiles one program, every stage's length is checked against
the context axis at start-up, and mesh.context=4 on 8 devices equals one device."""

import json
import os

import jax
import numpy as np
import pytest

from parallelism import mesh as mesh_lib
from tests.helpers import tiny_config
from training import curriculum, loop
from training.data import curriculum as data_curriculum
from training import data as data_lib
from training.data import tasks

SCHEDULE = '0:32,3:64,6:128'


def config(**overrides):
  c = tiny_config(**{'seq_len': 128, 'batch_size': 8, 'data.length_schedule': SCHEDULE,
                     **overrides})
  return c


def test_parse_and_errors_name_the_key():
  stages = data_curriculum.parse(config())
  assert [(s.start, s.seq_len, s.batch_size) for s in stages] == \
      [(0, 32, 32), (3, 64, 16), (6, 128, 8)]
  assert data_curriculum.parse(config(**{'data.length_schedule': '0:64:4,10:128'}))[0] == \
      data_curriculum.Stage(0, 64, 4)
  assert [data_curriculum.stage_index(stages, s) for s in range(8)] == [0, 0, 0, 1, 1, 1, 2, 2]
  for bad, why in (('0:48', 'cannot keep batch_size x seq_len = 1024'),
                   ('3:32,6:64', 'must start at step 0'), ('0:32,0:64', 'increasing'),
                   ('0:x', 'start_step:seq_len'), ('0:32:0', 'positive')):
    with pytest.raises(ValueError, match=r"^data\.length_schedule='") as e:
      data_curriculum.parse(config(**{'data.length_schedule': bad}))
    assert why in str(e.value) and '\n' not in str(e.value)


def test_stages_are_checked_against_the_context_axis_at_start_up():
  c = config(**{'mesh.data': 1, 'mesh.context': 8, 'parallelism.context_impl': 'ring',
                'data.length_schedule': '0:8:128,3:128'})
  with pytest.raises(ValueError, match=r'data\.length_schedule stage 0:8:128: seq_len=8 is not '
                     r'divisible by 2 x context size 8'):
    curriculum.StagedProgram(c, mesh_lib.make_mesh(c.mesh))


def test_batches_take_each_stage_shape_and_task_rows_continue_exactly():
  c = config(**{'data.source': 'synthetic'})
  it = data_lib.make_train_iterator(c)
  index = 0
  for step in range(9):
    b = next(it)
    L = (32, 64, 128)[step // 3]
    assert b['inputs'].shape == (1024 // L, L)
    src = tasks.SyntheticSource(c.seed, 'train', L, c.model.vocab_size)
    for row in b['inputs']:      # example `index` of the global stream, at the stage's length
      np.testing.assert_array_equal(row, src[index]['inputs'])
      index += 1
  st = it.get_state()['curriculum']
  assert st['stage'] == 2 and st['step'] == 9 and st['carried'] == 0
  assert [b['start'] for b in st['boundaries']] == [96, 96 + 48]


def test_document_stream_resumes_exactly_mid_stage():
  c = config(**{'data.shuffle_window': 0})
  whole = data_lib.make_train_iterator(c)
  first = [next(whole) for _ in range(4)]       # into stage 2
  saved = json.loads(json.dumps(whole.get_state()))
  assert saved['curriculum']['stage'] == 1
  rest = [next(whole) for _ in range(4)]        # crosses into stage 3
  again, how = data_lib.resume_train_iterator(c, {0: saved})
  assert how.startswith('exact (length schedule stage 1')
  for a, b in zip(rest, [next(again) for _ in range(4)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert first[0]['inputs'].shape == (32, 32) and rest[-1]['inputs'].shape == (8, 128)
  assert again.get_state()['curriculum']['carried'] > 0   # documents were split by a boundary


def _marked_corpus(path, num_docs=80, seed=0):
  """Documents whose every 9-byte unit says (document, unit): any piece of 18+ bytes tells
  which document and offset it is. 25 + 32k units: 9 * units - 1 targets, a multiple of 32,
  so no piece is shorter than 32 tokens."""
  rng = np.random.default_rng(seed)
  docs = [''.join(f'{i:03d}.{k:04d}|' for k in range(25 + 32 * int(rng.integers(0, 3))))
          for i in range(num_docs)]
  with open(path, 'w') as f:
    for d in docs:
      f.write(json.dumps({'text': d}) + '\n')
  return docs


def test_stage_boundaries_carry_every_target_exactly_once(tmp_path):
  """Pieces shuffled, documents split across both boundaries: every target token of every
  document is trained at most once, and every document below the watermark completely."""
  import re
  docs = _marked_corpus(tmp_path / 'docs.jsonl')
  c = config(**{'data.source': 'jsonl', 'data.paths': str(tmp_path / 'docs.jsonl'),
                'data.eval_fraction': 0.0, 'data.shuffle_window': 64})
  it = data_lib.make_train_iterator(c)
  seen = {i: np.zeros(len(d), int) for i, d in enumerate(docs)}   # times each target trained
  for _ in range(10):
    b = next(it)
    for row_in, row_t, seg in zip(b['inputs'], b['targets'], b['segment_ids']):
      for sid in set(seg.tolist()) - {0}:
        m = seg == sid
        text = bytes(row_in[m].astype(np.uint8)).decode()
        unit = re.search(r'(\d{3})\.(\d{4})\|', text)
        doc, offset = int(unit[1]), int(unit[2]) * 9 - unit.start()
        assert docs[doc][offset:offset + len(text)] == text
        seen[doc][offset + 1:offset + 1 + int((row_t[m] >= 0).sum())] += 1
  st = it.get_state()
  assert max(s.max() for s in seen.values()) == 1              # nothing trained twice
  assert st['curriculum']['carried'] > 0                        # boundaries split documents
  complete = sum(bool(s[1:].all()) for s in seen.values())
  G = st['position']['start'] + st['position']['watermark']    # global: one process
  assert complete >= G > 0                                      # nothing below it skipped


def _losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r for r in rows if 'train/loss' in r}, rows


def test_killed_in_stage_2_and_resumed_equals_uninterrupted(tmp_path):
  common = {'mesh.data': -1, 'log_every': 1, 'eval_every': -1, 'eval_batches': 0,
            'optimizer.decay_steps': 9, 'data.shuffle_window': 0}
  loop.run(config(steps=9, **common), str(tmp_path / 'whole'))
  loop.run(config(steps=5, **common), str(tmp_path / 'killed'))
  loop.run(config(steps=9, resume='auto', **common), str(tmp_path / 'killed'))
  whole, _ = _losses(tmp_path / 'whole')
  killed, rows = _losses(tmp_path / 'killed')
  assert sorted(whole) == sorted(killed) == list(range(1, 10))
  for s in whole:
    assert killed[s]['train/loss'] == pytest.approx(whole[s]['train/loss'], rel=1e-6), s
    assert killed[s]['data/seq_len'] == (32, 64, 128)[(s - 1) // 3]
  markers = [r for r in rows if 'run_start' in json.dumps(r)]
  assert any('exact' in json.dumps(r) for r in markers), markers


def _train(c, devices, steps):
  program = curriculum.StagedProgram(c, mesh_lib.make_mesh(c.mesh, devices=devices))
  state = program.init_state()
  it = data_lib.make_train_iterator(c)
  losses = []
  for _ in range(steps):
    state, m = program.train_step(state, program.global_batch(next(it)))
    losses.append(float(m['loss']))
  return program, losses


def test_context_parallel_schedule_equals_one_device_one_program_per_stage():
  one = config(**{'mesh.data': 1})
  ring = config(**{'mesh.data': 2, 'mesh.context': 4, 'parallelism.context_impl': 'ring'})
  p1, single = _train(one, jax.devices()[:1], 7)
  p8, parallel = _train(ring, jax.devices(), 7)
  np.testing.assert_allclose(parallel, single, rtol=2e-5)
  for p in (p1, p8):
    assert p.num_programs == 3   # the last stage is the run's own shape
    assert [prog.train_step._cache_size() for prog in p._programs.values()] == [1, 1, 1]
