"""Stopping a run on SIGTERM/SIGINT: after a saved step, at the same step on every process, and
never hung on a data wait; the run then ends with `Stopped` (exit status 128 + signal).

  * The first signal asks for a stop. The loop asks `agreed()` once per step: in a
    multi-process run each process contributes its flag to a tiny all-reduce (a max over one
    int per device) dispatched at step s and read at step s+1, so every process stops at the
    same step (the collective save cannot hang) and the host never waits on the reduction.
  * A data wait (`next_batch`) that is still blocked `grace_s` seconds after a stop request
    (3 s with one process, 30 s with several, where the agreed stop needs every process to
    finish its step) is abandoned: an empty or stalled input cannot swallow SIGTERM, and an
    ordinary wait of milliseconds still ends in a saved step.
  * A second signal ends the run at once, unsaved.

Why a data wait runs `next(iterator)` on a fetch thread: CPython runs a Python signal handler
only in the main thread, between bytecodes. A main thread blocked inside the pipeline's own
wait (a C++ call, a lock, a sleep) runs it only if that wait returns EINTR and the code checks
for signals, which a signal taken by another thread (XLA's, grain's) never causes, and a signal
arriving just before the blocking call begins does not either: the handler then waits for the
call to end (this hung tests/test_run_safety.py when other tests had run first). So the main
thread waits for the fetch thread's result in slices of POLL_S seconds, running any pending
handler and checking the stop request between them.
"""

import logging
import queue
import signal
import threading
import time
from typing import Any, Iterator

log = logging.getLogger('loomax')

SIGNALS = (signal.SIGTERM, signal.SIGINT)
POLL_S = 0.1  # the longest a data wait goes without running signal handlers or checking a stop


class Stopped(Exception):
  """The run stopped on a signal. `step`: the step reached; `saved`: whether it is on disk
  (else `last_saved`, possibly None, is where a resume starts)."""

  def __init__(self, signum: int, step: int, saved: bool, last_saved: int | None = None,
               during: str = ''):
    self.signum, self.step, self.saved = signum, step, saved
    self.last_saved = step if saved else last_saved
    self.during = during
    super().__init__(self.final_line())

  @property
  def exit_status(self) -> int:
    return 128 + int(self.signum)  # as shells report a signal: SIGTERM 143, SIGINT 130

  def final_line(self) -> str:
    name = signal.Signals(self.signum).name
    if self.saved:
      return f'stopped at step {self.step}, saved; resume with the same command ({name})'
    where = f' during {self.during}' if self.during else ''
    last = (f'the last saved step is {self.last_saved}' if self.last_saved is not None
            else 'a resume starts from the newest saved step')
    return (f'stopped at step {self.step}{where}, not saved ({last}); resume with the same '
            f'command ({name})')


class _Interrupt(BaseException):
  """Raised by the signal handler on a second signal, and in `next_batch` by a data wait still
  blocked grace_s after a stop request (a BaseException, so no `except Exception` swallows
  it)."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


class StopControl:
  """The run's signal handlers and its stop decision (see the module docstring)."""

  def __init__(self, process_count: int = 1, grace_s: float | None = None):
    self.process_count = process_count
    self.grace_s = grace_s if grace_s is not None else (3.0 if process_count == 1 else 30.0)
    self.signum: int | None = None
    self._requested_at = 0.0  # time.monotonic() of the first signal
    self._fetcher: _Fetcher | None = None
    self._previous: dict[int, Any] = {}
    self._reduction = None  # the all-reduce dispatched last step (multi-process)
    self._reduce_fn = None
    for sig in SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, self._handler)
      except ValueError:  # not the main thread (e.g. under some test runners)
        pass

  def _handler(self, signum, frame):
    del frame
    if self.signum is not None:
      log.warning('second signal %d: stopping now, without saving', signum)
      raise _Interrupt(signum)
    self._request(signum)
    log.warning('received signal %d: stopping after the current step, with a save', signum)

  def _request(self, signum: int) -> None:
    self.signum = signum
    self._requested_at = time.monotonic()

  def restore(self) -> None:
    """Puts the previous handlers back (a notebook or test process gets its signals back) and
    lets the fetch thread end."""
    if self._fetcher is not None:
      self._fetcher.close()
      self._fetcher = None
    for sig, old in self._previous.items():
      signal.signal(sig, old)
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def next_batch(self, iterator: Iterator, step: int):
    """next(iterator), on the fetch thread, while this thread waits in slices of POLL_S: a
    stop request ends the wait once it is still blocked grace_s seconds after the request (or
    after the wait began, for a stop agreed a step late); a second signal ends it at once. An
    abandoned wait leaves its fetch thread blocked in the iterator (the run ends, unsaved)."""
    if self._fetcher is None:
      self._fetcher = _Fetcher()
    fetcher = self._fetcher
    began = time.monotonic()
    try:
      fetcher.request(iterator)
      while True:
        try:
          ok, value = fetcher.result(POLL_S)
        except queue.Empty:
          if (self.requested
              and time.monotonic() - max(began, self._requested_at) >= self.grace_s):
            log.warning('still waiting for data %.0f s after the stop request: stopping now',
                        self.grace_s)
            raise _Interrupt(self.signum) from None
          continue
        if ok:
          return value
        try:
          raise value  # the iterator's own exception (StopIteration, a data error)
        finally:
          value = None
    except _Interrupt as e:
      self._fetcher = None  # still inside next(iterator): never asked again
      fetcher.close()
      raise Stopped(self.signum or e.signum, step - 1, saved=False,
                    during='a data wait') from None

  def agreed(self) -> bool:
    """Whether to stop after this step: the local flag, or in a multi-process run the max of
    every process's flag as of the previous step (the same answer on every process)."""
    if self.process_count == 1:
      return self.requested
    import jax
    import numpy as np
    previous = self._reduction
    if self._reduce_fn is None:
      self._reduce_fn = _flag_all_reduce()
    self._reduction = self._reduce_fn(np.int32(self.requested))
    if previous is None:
      return False
    stop = bool(jax.device_get(previous))
    if stop and self.signum is None:
      self._request(signal.SIGTERM)  # another process was signalled
      log.warning('another process received a stop signal: stopping at this step, with a save')
    return stop


class _Fetcher:
  """A daemon thread that calls next(iterator) when asked and hands back (True, batch) or
  (False, exception): the blocking part of a data wait, off the main thread."""

  def __init__(self):
    self._requests: queue.SimpleQueue = queue.SimpleQueue()
    self._results: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=self._serve, name='loomax-data-fetch', daemon=True).start()

  def _serve(self) -> None:
    while (iterator := self._requests.get()) is not None:
      try:
        result = (True, next(iterator))
      except BaseException as e:  # noqa: BLE001 - handed to the waiting thread, raised there
        result = (False, e)
      self._results.put(result)
      del iterator, result  # hold no batch while idle

  def request(self, iterator: Iterator) -> None:
    self._requests.put(iterator)

  def result(self, timeout: float) -> tuple[bool, Any]:
    """(ok, batch or exception); queue.Empty when none came within timeout seconds."""
    return self._results.get(timeout=timeout)

  def close(self) -> None:
    """The thread ends once its current next() (if any) returns."""
    self._requests.put(None)


def _flag_all_reduce():
  """int -> a device scalar: the max of that int over every process (asynchronous)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  mesh = Mesh(np.array(jax.devices()), ('all',))
  sharding = NamedSharding(mesh, P('all'))
  reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
  local = len(jax.local_devices())

  def run(flag):
    x = jax.make_array_from_process_local_data(sharding, np.full((local,), flag, np.int32))
    return reduce(x)

  return run


def final_line(error: BaseException) -> str:
  """The last log line of a run that a signal ended."""
  if isinstance(error, Stopped):
    return error.final_line()
  name = signal.Signals(error.signum).name if isinstance(error, _Interrupt) else 'a signal'
  return f'stopped at once by a second signal ({name}), not saved; resume with the same command'


def exit_status(error: BaseException) -> int | None:
  """128 + signal for a Stopped run or a second-signal interrupt; None for anything else."""
  if isinstance(error, Stopped):
    return error.exit_status
  if isinstance(error, _Interrupt):
    return 128 + int(error.signum)
  return None
