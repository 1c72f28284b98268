"""Runs that cannot collide, hang, or lie about how they ended (issue 27): one writer per
workdir, exit statuses, no hang on empty or stalled input, whole metrics rows, and user errors
as one line with status 2. Checkpoint-integrity cases are in tests/test_trust_checkpoints.py,
the two-process agreed stop in tests/test_multiprocess.py."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from checkpoint.manager import Checkpointer
from tests.helpers import tiny_config
from training import checkpointing, loop
from training.safety import config_checks, errors, run_files, stop, workdir_lock
from training import data as data_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = {'data.source': 'synthetic', 'eval_every': 0, 'eval_batches': 1, 'log_every': 1,
        'steps': 2, 'checkpoint.async_save': False}
CLI = ['--config', 'configs/tiny.py', '--config.data.source=synthetic',
       '--config.model.num_layers=1', '--config.model.d_model=32', '--config.model.num_heads=2',
       '--config.model.num_kv_heads=1', '--config.model.head_dim=16', '--config.model.mlp_dim=64',
       '--config.seq_len=32', '--config.batch_size=4', '--config.eval_batches=1',
       '--config.eval_every=0', '--config.log_every=1', '--config.perf.peak_flops=1e12',
       '--config.progress=False', '--config.optimizer.warmup_steps=2']


def cli(script, *args, timeout=180):
  flags = os.environ.get('XLA_FLAGS', '').replace('--xla_force_host_platform_device_count=8', '')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': flags.strip()}  # one device
  env.pop('LOOMAX_DEBUG', None)
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def stderr_lines(out):
  return [line for line in out.stderr.strip().splitlines() if line.strip()]


# --- one writer per workdir -------------------------------------------------------------------

def test_a_held_workdir_is_refused_at_once_and_a_dead_holders_lock_is_taken_over(tmp_path,
                                                                                  caplog):
  workdir = str(tmp_path / 'w')
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; sys.path.insert(0, sys.argv[1]); '
       'from training.safety import workdir_lock; workdir_lock.try_acquire(sys.argv[2]); '
       'print("held", flush=True); time.sleep(120)', ROOT, workdir],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(errors.UserError, match=rf'in use by another run \(pid {holder.pid} on '
                       rf"host '{socket.gethostname()}'"):
      loop.run(tiny_config(**FAST), workdir)
    assert sorted(os.listdir(workdir)) == [workdir_lock.LOCK_NAME]  # nothing written
  finally:
    holder.kill()
    holder.wait()
  # The holder died without releasing (a SIGKILL): taken over with a WARNING, then released.
  with caplog.at_level(logging.WARNING, logger='loomax'):
    row = loop.run(tiny_config(**FAST), workdir)
  assert row['step'] == 2
  assert any(f'stale lock of a run that is gone (pid {holder.pid}' in r.getMessage()
             for r in caplog.records)
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))
  # A lock from another host is never broken: refused with a hint to remove it by hand.
  with open(os.path.join(workdir, workdir_lock.LOCK_NAME), 'w') as f:
    json.dump({'host': 'node-elsewhere', 'pid': 1, 'started': 'earlier'}, f)
  with pytest.raises(errors.UserError, match="host 'node-elsewhere'") as e:
    loop.run(tiny_config(**FAST), workdir)
  assert 'another host' in e.value.hint


# --- exit statuses and stops ------------------------------------------------------------------

def test_sigint_stops_after_a_save_and_says_so(tmp_path):
  workdir = str(tmp_path)
  metrics = os.path.join(workdir, 'metrics.jsonl')

  def interrupt_after_a_step():
    deadline = time.time() + 240
    while time.time() < deadline:
      if os.path.exists(metrics) and 'train/loss' in open(metrics).read():
        os.kill(os.getpid(), signal.SIGINT)
        return
      time.sleep(0.02)

  threading.Thread(target=interrupt_after_a_step, daemon=True).start()
  with pytest.raises(stop.Stopped) as e:
    loop.run(tiny_config(**{**FAST, 'steps': 100_000}), workdir)
  assert e.value.saved and e.value.exit_status == 130
  assert e.value.final_line().startswith(f'stopped at step {e.value.step}, saved; resume with '
                                         'the same command')
  assert Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True).latest_step() == \
      e.value.step


@pytest.mark.parametrize('target', ['process', 'another thread'])
def test_sigterm_interrupts_a_blocked_data_wait(tmp_path, monkeypatch, target):
  """A stalled input (here: an iterator that never yields) cannot swallow SIGTERM, whichever
  thread takes the signal: as `kill` sends it (to the process), or taken by a thread other than
  the main one (as an XLA or grain thread may), which never interrupts a main thread blocked in
  the iterator, nor does a signal that lands just before the main thread blocks (this test hung
  after other test files, when the handler ran only once the 3600 s sleep ended)."""
  waiting = threading.Event()

  class Stalled:
    def __iter__(self):
      return self

    def __next__(self):
      waiting.set()
      time.sleep(3600)

    def get_state(self):
      return {}

  monkeypatch.setattr(data_lib, 'make_train_iterator', lambda *a, **k: Stalled())
  sent = []

  def terminate():
    waiting.wait(240)
    sent.append(time.time())
    if target == 'process':
      os.kill(os.getpid(), signal.SIGTERM)
    else:  # to this thread: the main thread learns of it only by running Python code
      signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

  threading.Thread(target=terminate, daemon=True).start()
  with pytest.raises(stop.Stopped, match='during a data wait, not saved') as e:
    loop.run(tiny_config(**FAST), str(tmp_path))
  assert time.time() - sent[0] < 10 and e.value.exit_status == 143  # grace_s is 3 s
  assert e.value.final_line().startswith('stopped at step 0 during a data wait, not saved')


def test_a_signal_during_an_ordinary_data_wait_still_ends_in_a_saved_stop():
  """Only a wait still blocked grace_s after the request is interrupted: a signal landing in a
  wait of milliseconds lets the step finish (and be saved)."""
  class Slow:
    def __next__(self):
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.2)
      return 'batch'

  control = stop.StopControl(1, grace_s=2.0)
  try:
    assert control.next_batch(Slow(), 5) == 'batch'
    assert control.agreed() and control.signum == signal.SIGTERM
  finally:
    control.restore()


def test_a_second_signal_ends_a_data_wait_at_once_and_iterator_errors_pass_through():
  class Broken:
    def __next__(self):
      raise ValueError('bad shard')

  blocked = threading.Event()

  class Stalled:
    def __next__(self):
      blocked.set()
      threading.Event().wait()  # a wait that no signal ends

  control = stop.StopControl(1, grace_s=600.0)
  try:
    with pytest.raises(ValueError, match='bad shard'):
      control.next_batch(Broken(), 1)

    def twice():  # each to this thread, not the main one
      blocked.wait(60)
      signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
      deadline = time.time() + 60
      while not control.requested and time.time() < deadline:
        time.sleep(0.01)
      signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    threading.Thread(target=twice, daemon=True).start()
    start = time.time()
    with pytest.raises(stop.Stopped, match='during a data wait, not saved') as e:
      control.next_batch(Stalled(), 7)
    assert time.time() - start < 10 and e.value.step == 6 and e.value.exit_status == 143
  finally:
    control.restore()


def test_empty_corpus_is_a_one_line_error_naming_the_paths(tmp_path):
  for i in range(3):
    (tmp_path / f'empty{i}.txt').write_text('')
  (tmp_path / 'eval.txt').write_text('held-out text ' * 50)
  paths = str(tmp_path / 'empty*.txt')
  start = time.time()
  out = cli('train.py', *CLI, '--workdir', str(tmp_path / 'w'), '--config.steps=3',
            '--config.data.source=text', f'--config.data.paths={paths}',
            f'--config.data.eval_paths={tmp_path / "eval.txt"}', timeout=120)
  assert out.returncode == 2, out.stderr[-3000:]
  error, hint = stderr_lines(out)[-2:]  # after the INFO lines of the start
  assert error.startswith(f"train.py: error: data.paths='{paths}': no training document has 2 "
                          'or more tokens'), error
  assert hint.startswith('hint: ') and 'Traceback' not in out.stderr
  assert time.time() - start < 60


def test_exit_status_of_finished_nonfinite_and_invalid_runs(tmp_path):
  finished = cli('train.py', *CLI, '--workdir', str(tmp_path / 'ok'), '--config.steps=2')
  assert finished.returncode == 0, finished.stderr[-3000:]
  nonfinite = cli('train.py', *CLI, '--workdir', str(tmp_path / 'nan'), '--config.steps=6',
                  '--config.optimizer.lr=1e6', '--config.optimizer.clip_norm=0')
  assert nonfinite.returncode == errors.EXIT_NON_FINITE, nonfinite.stderr[-3000:]
  assert 'non-finite values at step' in stderr_lines(nonfinite)[-1]
  assert 'Traceback' not in nonfinite.stderr
  out = cli('train.py', *CLI, '--workdir', str(tmp_path / 'bad'), '--config.steps=0')
  assert out.returncode == 2 and stderr_lines(out) == [
      'train.py: error: steps=0 is out of range: must be >= 1 (configs/base.py)'], out.stderr
  assert not os.path.exists(tmp_path / 'bad')  # refused before anything was written


# --- user errors: one line, status 2 ----------------------------------------------------------

@pytest.mark.parametrize('overrides, message', [
    ({'steps': -3}, r'^steps=-3 is out of range: must be >= 1'),
    ({'log_every': 0}, r'^log_every=0 is out of range: must be >= 1'),
    ({'seq_len': 0}, r'^seq_len=0 is out of range'),  # not data.task_length
    ({'model.num_heads': 3}, r'model.num_kv_heads=2 must divide model.num_heads=3'),
    ({'batch_size': 6}, r'batch_size=6 is not divisible by mesh data x fsdp = 8'),
    ({'optimizer.lr': -1.0}, r'optimizer.lr=-1.0 is out of range: must be >= 0'),
    ({'checkpoint.keep': 0}, r'checkpoint.keep=0 is out of range'),
    ({'data.eval_fraction': 1.0}, r'data.eval_fraction=1.0 is out of range: must be in \[0, 1\)'),
    ({'data.source': 'text', 'data.paths': '/nonexistent/*.txt'},
     r"data.paths='/nonexistent/\*.txt' matched no files"),
])
def test_user_errors_name_the_key(overrides, message, tmp_path):
  with pytest.raises(errors.UserError, match=message):
    loop.run(tiny_config(**{**FAST, **overrides}), str(tmp_path / 'w'))


def test_bad_workdirs_are_user_errors(tmp_path):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(errors.UserError, match='is a file, not a directory'):
    loop.run(tiny_config(**FAST), str(tmp_path / 'file'))
  with pytest.raises(errors.UserError, match='cannot create it'):  # unwritable, even for root
    loop.run(tiny_config(**FAST), '/proc/loomax_workdir')


def test_every_range_in_base_is_documented_and_accepted_at_its_default():
  from configs import base
  c = base.get_config()
  config_checks.validate(c)
  source = open(os.path.join(ROOT, 'configs', 'base.py')).read()
  assert 'Every numeric key has a valid range' in source


def test_cli_user_error_is_one_line_with_status_2(tmp_path, capsys, monkeypatch):
  def main():
    raise errors.UserError('--step 99: no such checkpoint', hint='steps: 2, 4')

  monkeypatch.setattr(sys, 'argv', ['evaluate.py'])
  with pytest.raises(SystemExit) as e:
    errors.run_cli(main)
  assert e.value.code == 2
  assert capsys.readouterr().err.splitlines() == [
      'evaluate.py: error: --step 99: no such checkpoint', 'hint: steps: 2, 4']
  monkeypatch.setattr(sys, 'argv', ['evaluate.py', '--debug'])
  with pytest.raises(errors.UserError):  # --debug: the traceback
    errors.run_cli(main)


def test_train_py_user_errors_are_one_line(tmp_path):
  (tmp_path / 'file').write_text('x')
  out = cli('train.py', *CLI, '--workdir', str(tmp_path / 'file'))
  assert out.returncode == 2 and stderr_lines(out) == [
      f'train.py: error: --workdir {tmp_path / "file"} is a file, not a directory',
      'hint: give a directory path (it is created if missing)'], out.stderr


# --- run files --------------------------------------------------------------------------------

def test_a_torn_metrics_line_is_set_aside_before_appending(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "train/loss": 5.5}\n{"step": 2, "train/lo')
  checkpointing.mark_run_start(str(tmp_path), 2, {'mode': 'resume'})
  rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line parses
  assert [r.get('event') for r in rows] == [None, 'run_start']
  assert (tmp_path / 'metrics.jsonl.torn').read_text() == '{"step": 2, "train/lo\n'
  lines = run_files.JsonLines(str(path))
  lines.write({'step': 3})
  lines.close()
  assert json.loads(path.read_text().splitlines()[-1]) == {'step': 3}
