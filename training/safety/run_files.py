"""A run's own files in its workdir, written so that a crash, a full disk or a refused start
never leaves them half-written or wrong.

  * config.json: written atomically (temp file + rename) and only after the config was
    validated and the start (resume/init) succeeded; each checkpoint step keeps its own
    resolved config in its metadata (what evaluate/generate load a step with).
  * metrics.jsonl: one os.write per row on an O_APPEND descriptor, so rows never interleave or
    split; a torn last line (a crash or a full disk mid-write) is moved to metrics.jsonl.torn
    before the next run appends.
"""

import json
import logging
import os
import tempfile

log = logging.getLogger('loomax')

METRICS = 'metrics.jsonl'


def write_atomic(path: str, text: str) -> None:
  """`path` holds either its old content or all of `text`, never a part."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', dir=directory)
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise


def write_config(config, workdir: str) -> None:
  """workdir/config.json from the resolved config (process 0; call after the start)."""
  import jax
  from checkpoint.manager import config_json
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    write_atomic(os.path.join(workdir, 'config.json'), config_json(config))


def repair_torn_line(path: str) -> bool:
  """Moves a last line without its newline to `path`.torn (appended) and truncates it away.
  Returns whether one was found."""
  try:
    size = os.path.getsize(path)
  except OSError:
    return False
  if size == 0:
    return False
  with open(path, 'rb+') as f:
    f.seek(size - 1)
    if f.read(1) == b'\n':
      return False
    f.seek(0)
    data = f.read()
    cut = data.rfind(b'\n') + 1  # 0 when the whole file is one torn line
    with open(path + '.torn', 'ab') as side:
      side.write(data[cut:] + b'\n')
    f.truncate(cut)
  log.warning('%s: its last line was torn (a crash or a full disk mid-write): moved %d bytes '
              'to %s.torn', path, size - cut, os.path.basename(path))
  return True


class JsonLines:
  """Appends whole JSON rows to a file: one write per row, flushed by the OS call itself."""

  def __init__(self, path: str):
    repair_torn_line(path)
    self.path = path
    self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

  def write(self, row: dict) -> None:
    line = (json.dumps(row) + '\n').encode()
    written = os.write(self.fd, line)
    if written != len(line):  # a full disk: the rest would glue onto the next row
      raise OSError(f'{self.path}: wrote {written} of {len(line)} bytes of a row (disk full?)')

  def close(self) -> None:
    if self.fd is not None:
      os.close(self.fd)
      self.fd = None


def append_row(workdir: str, row: dict) -> None:
  """One row appended to workdir/metrics.jsonl (after repairing a torn last line)."""
  lines = JsonLines(os.path.join(workdir, METRICS))
  try:
    lines.write(row)
  finally:
    lines.close()
