"""Stop requests from the operating system: SIGTERM (a preemption) or SIGINT (Ctrl-C) ask the
training loop to finish the current step, save it and stop; a second signal interrupts at once.
"""

import logging
import signal

log = logging.getLogger('loomax')


class StopSignals:
  """Installs the handlers (`install`), answers `stop_requested()` once per step, and puts the
  previous handlers back (`restore`), so a notebook or test process gets its Ctrl-C and
  SIGTERM back. Outside the main thread (some test runners) nothing is installed."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self._stop = False
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    if self._stop:
      raise KeyboardInterrupt
    self._stop = True
    log.warning('received signal %d', signum)

  def install(self) -> 'StopSignals':
    for sig in self.SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, self._handler)
      except ValueError:  # not the main thread
        pass
    return self

  def stop_requested(self) -> bool:
    return self._stop

  def restore(self) -> None:
    for sig, old in self._previous.items():
      signal.signal(sig, old)
    self._previous = {}
