"""One writer per workdir: an exclusive lock file taken before a run writes anything.

`workdir/loomax.lock` holds JSON {host, pid, started, argv}; it is created with O_CREAT|O_EXCL,
which is atomic on local and NFS (v3+) filesystems, so of two runs started together exactly one
gets it. A second run into a held workdir fails at once with a UserError naming the holder.

Stale locks (a run that was SIGKILLed or lost its node leaves its lock behind):
  * holder on this host and its pid is gone: the lock is taken over with a WARNING naming the
    dead holder (the old file is kept beside it as loomax.lock.stale); nothing else can be
    writing, and asking a user to delete the file after every preemption helps nobody.
  * holder on another host: never broken; the error says how to remove the file once that run
    is known to be gone (this host cannot see the other host's processes).
  * holder on this host and its pid is alive: refused (it may be a live run).
In a multi-process run, process 0 takes the lock and tells the others whether it got it.
"""

import datetime
import json
import logging
import os
import socket
import sys

from checkpoint.errors import UserError

log = logging.getLogger('loomax')

LOCK_NAME = 'loomax.lock'


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # it exists, owned by someone else
    return True
  return True


def _describe(holder: dict) -> str:
  if not holder.get('host'):
    return 'an unreadable or half-written lock file'
  return (f"pid {holder.get('pid')} on host {holder.get('host')!r} since "
          f"{holder.get('started')}")


class WorkdirLock:
  """The held lock; `release()` removes the file if it is still this run's."""

  def __init__(self, path: str | None, token: dict | None):
    self.path, self.token = path, token

  def release(self) -> None:
    if self.path is None:
      return
    try:
      with open(self.path) as f:
        if json.load(f) == self.token:
          os.remove(self.path)
    except (OSError, ValueError):
      pass
    self.path = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def _make_workdir(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir {workdir} is a file, not a directory',
                    hint='give a directory path (it is created if missing)')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f'--workdir {workdir}: cannot create it ({e.strerror})') from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise UserError(f'--workdir {workdir} is not writable',
                    hint='fix its permissions or choose another --workdir')


def _read(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}  # being written right now, or damaged: treated as held by an unknown run


def try_acquire(workdir: str) -> WorkdirLock:
  """Takes the lock of `workdir` for this process (creating the directory); raises UserError
  when another run holds it."""
  workdir = os.path.abspath(workdir)
  _make_workdir(workdir)
  path = os.path.join(workdir, LOCK_NAME)
  host = socket.gethostname()
  token = {'host': host, 'pid': os.getpid(),
           'started': datetime.datetime.now(datetime.timezone.utc).isoformat(
               timespec='seconds'),
           'argv': sys.argv[:1] + [a for a in sys.argv[1:] if a.startswith('--')][:20]}
  for _ in range(3):  # a takeover races with nothing but another takeover: retry a little
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _read(path)
      if holder is None:
        continue  # released meanwhile
      if holder.get('host') == host and isinstance(holder.get('pid'), int) \
          and not _pid_alive(holder['pid']):
        try:
          os.replace(path, path + '.stale')
        except FileNotFoundError:
          continue  # another run took it over first
        log.warning('workdir %s: stale lock of a run that is gone (%s): taking the workdir '
                    'over (the old lock is kept as %s.stale)', workdir, _describe(holder),
                    LOCK_NAME)
        continue
      where = ('that run may still be alive on another host; if it is gone, delete '
               f'{path}' if holder.get('host') not in (None, host) else
               f'stop that run first, or choose another --workdir (if it is not a loomax run, '
               f'delete {path})')
      raise UserError(f'--workdir {workdir} is in use by another run ({_describe(holder)}; '
                      f'lock file {path})', hint=where)
    except OSError as e:
      raise UserError(f'--workdir {workdir}: cannot create its lock file ({e.strerror})') from e
    with os.fdopen(fd, 'w') as f:
      f.write(json.dumps(token))
      f.flush()
      os.fsync(f.fileno())
    return WorkdirLock(path, token)
  raise UserError(f'--workdir {workdir}: could not take its lock file {path} (contended)')


def acquire(workdir: str) -> WorkdirLock:
  """The workdir lock for this run: process 0 takes it; in a multi-process run every process
  learns whether it did (and all raise the same UserError if not)."""
  import jax
  if jax.process_count() == 1:
    return try_acquire(workdir)
  from jax.experimental import multihost_utils
  import numpy as np
  lock, error = WorkdirLock(None, None), None
  if jax.process_index() == 0:
    try:
      lock = try_acquire(workdir)
    except UserError as e:
      error = e
  ok = multihost_utils.broadcast_one_to_all(np.array(error is None, np.int32))
  if error is not None:
    raise error
  if not int(ok):
    raise UserError(f'--workdir {os.path.abspath(workdir)} could not be locked by process 0 '
                    '(its log names the holder)')
  return lock
