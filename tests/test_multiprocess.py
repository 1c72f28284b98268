"""Two processes x 4 CPU devices through jax.distributed train like one process x 8 devices."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from tests.helpers import tiny_config
from training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {'data.source': 'synthetic', 'model.num_layers': 1, 'model.d_model': 32,
             'model.num_heads': 2, 'model.num_kv_heads': 1, 'model.head_dim': 16,
             'model.mlp_dim': 64, 'seq_len': 32, 'batch_size': 8, 'eval_batches': 1,
             'log_every': 1, 'eval_every': 0, 'distributed.heartbeat_timeout_s': 10,
             'optimizer.warmup_steps': 2}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch(workdir, steps, num_processes=2):
  port = free_port()
  args = [f'--config.{k}={v}' for k, v in {**OVERRIDES, 'steps': steps,
                                             'perf.peak_flops': 1e12, 'progress': False}.items()]
  procs = []
  for pid in range(num_processes):
    env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
           'JAX_PLATFORMS': 'cpu', 'LOOMAX_COORDINATOR': f'localhost:{port}',
           'LOOMAX_NUM_PROCESSES': str(num_processes), 'LOOMAX_PROCESS_ID': str(pid)}
    log = open(os.path.join(workdir, f'process{pid}.log'), 'w')
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'train.py'), '--config', 'configs/tiny.py',
         '--workdir', workdir, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def train_losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [r['train/loss'] for r in rows if 'train/loss' in r]


def test_two_processes_match_one(tmp_path):
  steps = 3
  os.makedirs(tmp_path / 'multi')
  procs = launch(str(tmp_path / 'multi'), steps)
  c = tiny_config(**OVERRIDES, **{'steps': steps, 'mesh.data': -1})
  loop.run(c, str(tmp_path / 'single'))
  for p in procs:
    assert p.wait(timeout=300) == 0, open(tmp_path / 'multi' / 'process0.log').read()[-3000:]
  multi = train_losses(str(tmp_path / 'multi'))
  assert len(multi) == steps
  np.testing.assert_allclose(multi, train_losses(str(tmp_path / 'single')), rtol=1e-5)
  # Only process 0 writes metrics and events.
  assert os.path.exists(tmp_path / 'multi' / 'tb')


def test_dead_peer_stops_the_others(tmp_path):
  procs = launch(str(tmp_path), steps=100_000)
  try:
    metrics = tmp_path / 'metrics.jsonl'
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.stat().st_size) and time.time() < deadline:
      assert procs[0].poll() is None, 'process 0 ended before training started'
      time.sleep(0.5)
    assert metrics.exists(), 'training never started'
    procs[1].kill()
    rc = procs[0].wait(timeout=120)  # heartbeat timeout is 10 s
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert rc != 0
  log = open(tmp_path / 'process0.log').read()
  assert 'another task died' in log or 'stopped sending heartbeats' in log, log[-2000:]


def test_sigterm_to_one_process_stops_all_at_one_agreed_saved_step(tmp_path):
  """Preemption that reaches one process only: every process stops at the same step (the flag
  is all-reduced each step), the collective save completes, and both exit 143 (issue 27)."""
  procs = launch(str(tmp_path), steps=100_000)
  try:
    metrics = tmp_path / 'metrics.jsonl'
    deadline = time.time() + 240
    while not (metrics.exists() and 'train/loss' in metrics.read_text()) \
        and time.time() < deadline:
      assert procs[0].poll() is None, open(tmp_path / 'process0.log').read()[-3000:]
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  logs = [open(tmp_path / f'process{i}.log').read() for i in range(2)]
  assert codes == [143, 143], [log[-2000:] for log in logs]
  stopped = [re.findall(r'stopped at step (\d+), saved; resume with the same command', log)
             for log in logs]
  assert stopped[0] and stopped[0] == stopped[1], stopped
  step = int(stopped[0][0])
  from checkpoint.manager import Checkpointer
  assert Checkpointer(str(tmp_path / 'checkpoints'), read_only=True).latest_step() == step
  assert not os.path.exists(tmp_path / 'loomax.lock')  # process 0 held it and let it go
