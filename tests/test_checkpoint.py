"""Universal checkpoints through the training loop: a run saved on mesh A resumes on other meshes,
device counts, layer layouts and process counts with the losses of an uninterrupted run; kills
(SIGKILL, also during a save) and SIGTERM lose nothing; the data position maps across a change of
process count as training/data/position.py states."""

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import grain
import numpy as np
import pytest

from checkpoint.manager import Checkpointer
from tests.helpers import tiny_config
from training import data as data_lib
from training import loop
from training.data import position, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A constant schedule makes the first k steps of every run the same whatever config.steps is.
COMMON = {'data.source': 'synthetic', 'optimizer.schedule': 'constant', 'log_every': 1,
          'eval_every': 0, 'eval_batches': 1, 'checkpoint.async_save': True}
MESH_A = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.context': 2, 'mesh.tensor': 1}
STEPS = 8


def mesh(**sizes):
  return {f'mesh.{a}': sizes.get(a, 1) for a in ('data', 'fsdp', 'context', 'tensor')}


def config(steps, **overrides):
  return tiny_config(**{**COMMON, **MESH_A, 'steps': steps, **overrides})


def losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


def final_position(workdir):
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  return position.resume_point(ckpt.read_data(ckpt.latest_step()))


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch(workdir, overrides, devices, num_processes=1):
  """train.py in fresh processes with `devices` CPU devices each (non-blocking)."""
  os.makedirs(workdir, exist_ok=True)
  args = [f'--config.{k}={v}' for k, v in overrides.items()]
  port, procs = free_port(), []
  for pid in range(num_processes):
    env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
           'JAX_PLATFORMS': 'cpu'}
    if num_processes > 1:
      env.update(LOOMAX_COORDINATOR=f'localhost:{port}', LOOMAX_NUM_PROCESSES=str(num_processes),
                 LOOMAX_PROCESS_ID=str(pid))
    log = open(os.path.join(workdir, f'process{pid}.log'), 'w')
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'train.py'), '--config', 'configs/tiny.py',
         '--workdir', workdir, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def cli_overrides(steps, **overrides):
  """The same config as `config()` on the command line (tiny_config's shrinking included)."""
  c = config(steps, **overrides)
  keys = ['model.num_layers', 'model.d_model', 'model.num_heads', 'model.num_kv_heads',
          'model.head_dim', 'model.mlp_dim', 'batch_size', 'seq_len', 'steps',
          'optimizer.warmup_steps', 'perf.peak_flops', 'progress', *COMMON, *MESH_A, *overrides]
  out = {}
  for k in keys:
    node = c
    for part in k.split('.'):
      node = node[part]
    out[k] = node
  out['distributed.heartbeat_timeout_s'] = 10
  return out


def wait(procs, workdir, timeout=300):
  for p in procs:
    rc = p.wait(timeout=timeout)
    assert rc == 0, open(os.path.join(workdir, 'process0.log')).read()[-3000:]


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """STEPS uninterrupted steps on mesh A, checkpointing every 3 steps."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  loop.run(config(STEPS, **{'checkpoint.every': 3}), workdir)
  return workdir, losses(workdir)


@pytest.fixture(scope='module')
def step3(reference, tmp_path_factory):
  """The step-3 checkpoint of the reference run alone in its own directory (what a 3-step run
  on mesh A saves: with a constant schedule the two runs are the same computation)."""
  d = tmp_path_factory.mktemp('step3') / 'checkpoints'
  shutil.copytree(os.path.join(reference[0], 'checkpoints', '3'), d / '3')
  return str(d)


def check_continues(reference, workdir, first, last):
  _, want = reference
  got = losses(workdir)
  np.testing.assert_allclose([got[s] for s in range(first, last + 1)],
                             [want[s] for s in range(first, last + 1)], rtol=1e-5, atol=1e-5)


def test_resume_on_other_meshes_devices_and_processes(reference, step3, tmp_path):
  """A (data=2, fsdp=2, context=2) -> several B; steps 4..6 match the uninterrupted run."""
  elsewhere = {
      '4_devices_data4': (launch(str(tmp_path / 'd4'), cli_overrides(
          6, **mesh(data=4), resume=step3), devices=4), str(tmp_path / 'd4')),
      '1_device': (launch(str(tmp_path / 'd1'), cli_overrides(6, **mesh(data=1), resume=step3),
                          devices=1), str(tmp_path / 'd1')),
      '2_processes_data2_fsdp4': (launch(str(tmp_path / 'p2'), cli_overrides(
          6, **mesh(data=2, fsdp=4), resume=step3), devices=4, num_processes=2),
          str(tmp_path / 'p2')),
  }
  in_process = {'fsdp8_scanned': {**mesh(fsdp=8), 'model.scan_layers': True},
                'data2_fsdp2_tensor2': mesh(data=2, fsdp=2, tensor=2)}
  for name, overrides in in_process.items():
    workdir = str(tmp_path / name)
    loop.run(config(6, resume=step3, **overrides), workdir)
    check_continues(reference, workdir, 4, 6)
    assert final_position(workdir) == 6 * 8, name  # the same examples, no gap, no repeat
  for name, (procs, workdir) in elsewhere.items():
    wait(procs, workdir)
    check_continues(reference, workdir, 4, 6)
    assert final_position(workdir) == 6 * 8, name


def wait_for(predicate, proc, timeout=240):
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, 'the training process ended early'
    assert time.time() < deadline, 'timed out'
    time.sleep(0.05)


def steps_on_disk(directory):
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) \
      if os.path.isdir(directory) else []


def test_sigkill_and_sigterm(reference, tmp_path):
  killed, termed = str(tmp_path / 'killed'), str(tmp_path / 'termed')
  # Saving every step (synchronously) keeps a save in progress most of the time.
  kill_proc = launch(killed, cli_overrides(1000, **{'checkpoint.every': 1,
                                                    'checkpoint.async_save': False}), 8)[0]
  term_proc = launch(termed, cli_overrides(1000), 8)[0]
  try:
    ckpts = os.path.join(killed, 'checkpoints')
    wait_for(lambda: len(steps_on_disk(ckpts)) >= 1 and steps_on_disk(ckpts)[-1] >= 2, kill_proc)
    kill_proc.send_signal(signal.SIGKILL)
    kill_proc.wait(timeout=60)
    metrics = os.path.join(termed, 'metrics.jsonl')
    wait_for(lambda: os.path.exists(metrics) and len(open(metrics).readlines()) >= 2, term_proc)
    term_proc.send_signal(signal.SIGTERM)
    # A preempted run is not a finished one: 128 + SIGTERM, as shells report it (issue 27).
    assert term_proc.wait(timeout=120) == 143, open(os.path.join(termed, 'process0.log')).read()
  finally:
    for p in (kill_proc, term_proc):
      if p.poll() is None:
        p.kill()
  # SIGTERM: the loop stopped early and saved the step it reached, with no eval before the
  # save (nor after it: the final eval is skipped, and the log says so).
  last = max(losses(termed))
  assert 2 <= last < 1000
  assert Checkpointer(os.path.join(termed, 'checkpoints'), read_only=True).latest_step() == last
  rows = [json.loads(line) for line in open(os.path.join(termed, 'metrics.jsonl'))]
  assert not [r for r in rows if 'eval/loss' in r]
  log = open(os.path.join(termed, 'process0.log')).read()
  assert 'exiting without the final eval' in log
  assert log.strip().splitlines()[-1].endswith(
      f'stopped at step {last}, saved; resume with the same command (SIGTERM)')

  # SIGKILL: a save cut short is a temporary directory, never a step. Plant one more, a
  # truncated copy of the newest step, as if the kill had come during the next save.
  saved = Checkpointer(ckpts, read_only=True).latest_step()
  assert saved is not None and saved <= STEPS - 3, f'ran too far before the kill ({saved})'
  partial = os.path.join(ckpts, f'{saved + 1}.orbax-checkpoint-tmp-1')
  shutil.copytree(os.path.join(ckpts, str(saved)), partial)
  shutil.rmtree(os.path.join(partial, 'opt_state'))
  loop.run(config(saved + 3, resume='auto', **{'checkpoint.every': 1}), killed)
  check_continues(reference, killed, saved + 1, saved + 3)


def doc_corpus(directory, n=120):
  for i in range(n):
    (directory / f'{i:03d}.txt').write_text(''.join(f'<{i:03d}.{j}>' for j in range(3 + i % 23)))


def row_pieces(batch):
  out = []
  for r in range(len(batch['inputs'])):
    seg, inp, tgt = batch['segment_ids'][r], batch['inputs'][r], batch['targets'][r]
    for s in range(1, int(seg.max(initial=0)) + 1):
      idx = np.flatnonzero(seg == s)
      out.append(np.append(inp[idx], tgt[idx[-1]]).astype(np.uint8).tobytes())
  return out


def test_data_position_maps_across_process_counts(tmp_path):
  """1 process -> 2 processes on packed documents: nothing skipped, repeats only in flight."""
  doc_corpus(tmp_path)
  c = tiny_config(**{'data.paths': str(tmp_path / '*.txt'), 'data.source': 'text',
                     'data.eval_fraction': 0.0, 'data.shuffle_window': 16,
                     'data.num_packing_bins': 4, 'seq_len': 32, 'batch_size': 4})
  it = data_lib.make_train_iterator(c)
  before = collections.Counter(p for _ in range(20) for p in row_pieces(next(it)))
  saved = {0: it.get_state()}
  g = position.resume_point(saved)
  after = collections.Counter()
  its = [data_lib.resume_train_iterator(c, saved, process_index=p, process_count=2)
         for p in range(2)]
  assert {how for _, how in its} == {'remapped'}
  for _ in range(15):
    for i, _ in its:
      after.update(row_pieces(next(i)))
  g_after = position.resume_point({p: i.get_state() for p, (i, _) in enumerate(its)})
  stream = grain.MapDataset.source(sources.make_document_source(c, 'train')).shuffle(
      seed=c.seed).repeat()

  def pieces(lo, hi):
    out = collections.Counter()
    for pos in range(lo, hi):
      t = np.asarray(stream[pos], np.uint8).tobytes()
      out.update(t[i:min(i + c.seq_len, len(t) - 1) + 1] for i in range(0, len(t) - 1, c.seq_len))
    return out

  assert 0 < g < g_after
  assert g_after < 120, 'keep the check inside one epoch'
  # Every document before G was emitted completely before the checkpoint ...
  assert not pieces(0, g) - before
  # ... and every document up to the new run's position was emitted by one run or the other.
  assert not pieces(0, g_after) - (before + after)
  # Repeats are only documents at positions >= G read before the checkpoint (in flight).
  read_before = max(int(j) for j in saved[0]['pending']) + 1 if saved[0]['pending'] else g
  repeated = before & after
  assert repeated, 'expected some in-flight documents to be seen again'
  assert not repeated - pieces(g, read_before)
