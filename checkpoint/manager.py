"""Orbax checkpoints: arrays as global logical arrays, the data position per process, and JSON
metadata, written asynchronously and atomically.

One step directory holds the items
  params, opt_state, train   arrays (OCDBT), as plain string-keyed trees of their paths;
  data                       one JSON file per writing process: its data-iterator state;
  meta                       JSON: resolved config, layer layout, every array's logical axes,
                             global shape and dtype (checkpoint/metadata.py).
Orbax writes a step into a temporary directory and renames it when every item is complete, so a
step cut short (a kill during the save) is never listed and the previous step is used. Where
arrays are restored is decided by the shardings of the restore target only.
"""

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from checkpoint import integrity, metadata
from checkpoint.errors import UserError
from checkpoint.metadata import SEP

log = logging.getLogger('loomax')


class CheckpointError(UserError, RuntimeError):
  """A checkpoint is missing, truncated or corrupted (names the file or array): input, not a
  bug (a UserError: one line from a CLI); still a RuntimeError for older callers."""


class DataStatesHandler(ocp.CheckpointHandler):
  """Per-process data-iterator states as JSON files process_<p>-of-<n>.json.

  Every process saves its own state; restore returns the states of every process that wrote
  one, so a run with another process count can map the position (training/data/position.py).
  """

  def save(self, directory: epath.Path, args: 'DataStatesSave') -> None:
    for pid, state in args.states.items():
      (directory / data_file_name(pid, args.process_count)).write_text(json.dumps(state))

  def restore(self, directory: epath.Path, args: 'DataStatesRestore | None' = None) -> dict:
    del args
    out = {}
    for f in sorted(directory.glob('process_*-of-*.json')):
      pid = int(f.name.split('_')[1].split('-')[0])
      try:
        out[pid] = json.loads(f.read_text())
      except json.JSONDecodeError as e:
        raise CheckpointError(f'{f}: data-iterator state is not valid JSON ({e})') from e
    return out

  def metadata(self, directory: epath.Path) -> None:
    del directory

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    pass


def data_file_name(pid: int, process_count: int) -> str:
  return f'process_{pid}-of-{process_count}.json'


@ocp.args.register_with_handler(DataStatesHandler, for_save=True)
@dataclasses.dataclass
class DataStatesSave(ocp.args.CheckpointArgs):
  states: dict[int, dict]
  process_count: int


@ocp.args.register_with_handler(DataStatesHandler, for_restore=True)
@dataclasses.dataclass
class DataStatesRestore(ocp.args.CheckpointArgs):
  pass


class Checkpointer:
  """Step directories under `directory`; keeps the last `keep` (and every `keep_every`-th)."""

  def __init__(self, directory: str, *, keep: int | None = 3, keep_every: int = 0,
               async_save: bool = True, read_only: bool = False, verify: bool = True):
    self.directory = os.path.abspath(directory)
    self.verify = verify
    self._meta: dict[int, dict] = {}
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f'{self.directory}: no such checkpoint directory')
    handlers = {'params': ocp.PyTreeCheckpointHandler(),
                'opt_state': ocp.PyTreeCheckpointHandler(),
                'train': ocp.PyTreeCheckpointHandler(),
                'data': DataStatesHandler(),
                'meta': ocp.JsonCheckpointHandler()}
    absl_log = logging.getLogger('absl')  # Orbax warns that read-only is read-only: noise
    level = absl_log.level
    if read_only:
      absl_log.setLevel(logging.ERROR)
    try:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=None if read_only else keep, keep_period=keep_every or None,
          enable_async_checkpointing=async_save, create=not read_only, read_only=read_only)
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_handlers=handlers)
    finally:
      absl_log.setLevel(level)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, arrays: dict[str, jax.Array], meta: dict[str, Any],
           data_states: dict[int, dict] | None = None, *, force: bool = False,
           data_process_count: int | None = None) -> bool:
    """Saves flat {path: array} (see metadata.flatten) with `meta` (metadata.describe) and
    this process's data state(s) {process index: state} (of a run of `data_process_count`
    processes; default: this run's)."""
    self._meta.pop(step, None)
    items = metadata.split_items(arrays)
    args = {item: ocp.args.PyTreeSave(metadata.nest(flat)) for item, flat in items.items()}
    meta = {**meta, 'step': step, 'items': sorted(items),
            'checksums': integrity.array_checksums(arrays)}
    if data_states is not None:
      count = data_process_count or jax.process_count()
      args['data'] = DataStatesSave(data_states, count)
      meta['data_checksums'] = integrity.gather_data_checksums(
          {data_file_name(pid, count): integrity.bytes_checksum(json.dumps(s).encode())
           for pid, s in data_states.items()})
    meta['meta_checksum'] = integrity.meta_checksum(meta)  # covers every other field
    args['meta'] = ocp.args.JsonSave(meta)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def read_meta(self, step: int) -> dict[str, Any]:
    if step not in self._meta:
      self._meta[step] = self._read_meta(step)
    return self._meta[step]

  def _read_meta(self, step: int) -> dict[str, Any]:
    path = os.path.join(self.step_dir(step), 'meta')
    if not os.path.isdir(path):
      raise CheckpointError(f'{path}: missing (not a loomax checkpoint, or truncated)')
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - any failure to read is reported with the file
      raise CheckpointError(f'{path}: could not be read ({type(e).__name__}: {e})') from e
    meta = meta['meta']
    if not isinstance(meta, dict) or 'arrays' not in meta:
      raise CheckpointError(f'{path}: has no universal metadata (written by an older loomax?)')
    if meta.get('universal_checkpoint_version', 0) > metadata.VERSION:
      raise CheckpointError(f'{path}: universal_checkpoint_version '
                            f'{meta["universal_checkpoint_version"]} is newer than this loomax '
                            f'reads ({metadata.VERSION})')
    if self.verify:
      self._verify_meta(step, path, meta)
    return meta

  def _verify_meta(self, step: int, path: str, meta: dict[str, Any]) -> None:
    """The metadata's own checksum; a step written before checksums existed is reported as
    unverified (WARNING), never silently trusted."""
    recorded = meta.get('meta_checksum')
    if recorded is not None:
      got = integrity.meta_checksum(meta)
      if got != recorded:
        raise CheckpointError(f'{path}: metadata checksum mismatch (recorded {recorded}, read '
                              f'{got}): the step\'s metadata was edited or is corrupted')
    missing = [what for what, key in (('arrays', 'checksums'), ('metadata', 'meta_checksum'))
               if key not in meta]
    if missing:
      log.warning('step %d in %s: no checksums for its %s (written by an older loomax): '
                  'loading it unverified', step, self.directory, ' or '.join(missing))

  def read_arrays(self, step: int, targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, Any]:
    """Reads the arrays named in `targets` (current names, see metadata.current_names) into
    their shardings (dtype as in the checkpoint)."""
    stored = metadata.stored_names(self.read_meta(step))
    if stored:
      current = {v: k for k, v in stored.items()}
      got = self._read_arrays(step, {stored.get(p, p): t for p, t in targets.items()})
      return {current.get(p, p): x for p, x in got.items()}
    return self._read_arrays(step, targets)

  def _read_arrays(self, step: int, targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, Any]:
    by_item = metadata.split_items(targets)
    args = {}
    for item, flat in by_item.items():
      tree = metadata.nest(flat)
      # partial_restore: `targets` may be a subset (the converter reads in groups).
      args[item] = ocp.args.PyTreeRestore(
          item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree),
          partial_restore=True)
      self._check_item_present(step, item)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - reported with the array that fails to read
      raise self._pinpoint(step, by_item, e) from e
    arrays = metadata.join_items({item: metadata.flatten(out[item]) for item in by_item})
    # partial_restore hands back the target itself for an array it did not find.
    missing = sorted(p for p in targets
                     if p not in arrays or isinstance(arrays[p], jax.ShapeDtypeStruct))
    if missing:
      raise CheckpointError(f'{self.step_dir(step)}/{metadata.item_of(missing[0])}: array '
                            f'{missing[0]} is listed in the metadata but not stored '
                            '(truncated checkpoint?)')
    if self.verify:
      self._verify_arrays(step, arrays)
    return arrays

  def _verify_arrays(self, step: int, arrays: dict[str, Any]) -> None:
    """Checksums as recorded (none before checksums existed), and finite values (loomax saves
    finite steps only; an older loomax did not)."""
    want = self.read_meta(step).get('checksums') or {}
    got, finite = integrity.checksums_and_finite(arrays)
    for path in sorted(got):
      where = f'{self.step_dir(step)}/{metadata.item_of(path)}'
      if path in want and got[path] != want[path]:
        raise CheckpointError(f'{where}: checksum mismatch in array {path} (recorded '
                              f'{want[path]}, read {got[path]}): the file holding it is '
                              'corrupted')
      if not finite[path]:
        raise CheckpointError(f'{where}: array {path} holds non-finite values (a step saved '
                              'before loomax saved finite steps only?)')

  def read_data(self, step: int) -> dict[int, dict] | None:
    path = os.path.join(self.step_dir(step), 'data')
    want = self.read_meta(step).get('data_checksums') or {}
    if not os.path.isdir(path):
      if want and self.verify:  # the step was saved with a data state: it is damaged
        raise CheckpointError(f'{path}: missing, but the metadata records the data state of '
                              f'{len(want)} process(es) (truncated or damaged step)')
      if want:
        log.warning('%s: missing (checkpoint.verify=False): the data stream starts afresh',
                    path)
      return None
    if self.verify:
      for name, digest in sorted(want.items()):
        file = os.path.join(path, name)
        try:
          with open(file, 'rb') as f:
            got = integrity.bytes_checksum(f.read())
        except OSError as e:
          raise CheckpointError(f'{file}: could not be read ({e})') from e
        if got != digest:
          raise CheckpointError(f'{file}: checksum mismatch (recorded {digest}, read {got}): '
                                'the data-state file is corrupted')
    try:
      return self.manager.restore(step, args=ocp.args.Composite(
          data=DataStatesRestore()))['data']
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 - any failure to read is reported with the file
      raise CheckpointError(f'{path}: could not be read ({type(e).__name__}: {e})') from e

  def _check_item_present(self, step: int, item: str) -> None:
    path = os.path.join(self.step_dir(step), item)
    if not os.path.isdir(path):
      raise CheckpointError(f'{path}: missing (truncated checkpoint?)')

  def _pinpoint(self, step: int, by_item: dict, error: Exception) -> CheckpointError:
    """Restores arrays one at a time to name the one that fails."""
    for item, flat in by_item.items():
      for inner, target in flat.items():
        tree = metadata.nest({inner: target})
        try:
          self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.PyTreeRestore(
              item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree),
              partial_restore=True)}))
        except Exception as e:  # noqa: BLE001
          name = inner if item == 'train' else f'{item}{SEP}{inner}'
          return CheckpointError(f'{self.step_dir(step)}/{item}: array {name} could not be read '
                                 f'(corrupted or truncated checkpoint): {type(e).__name__}: '
                                 f'{str(e)[:500]}')
    return CheckpointError(f'{self.step_dir(step)}: could not be read (corrupted or truncated '
                           f'checkpoint): {type(error).__name__}: {str(error)[:500]}')

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def config_json(config) -> str:
  return json.dumps(config.to_dict(), default=str, indent=1)
