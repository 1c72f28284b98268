"""Orbax checkpoints of the train state, the data-iterator position and the run's config.

Arrays are saved as global logical arrays (OCDBT), so where they are restored is decided by
the shardings of the restore target, not by the mesh that wrote them.
"""

import json
import os
from typing import Any

import grain
import ml_collections
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, keep_every: int = 0,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_every or None,
        enable_async_checkpointing=async_save, create=True)
    handlers = {'state': ocp.StandardCheckpointHandler(),
                'data': grain.checkpoint.CheckpointHandler(),
                'meta': ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator, meta: dict, *, force: bool = False) -> bool:
    args = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      args['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, step: int, abstract_state: Any, data_iterator) -> tuple[Any, dict]:
    """Restores into `abstract_state`'s shardings; the iterator is restored in place."""
    args = {'state': ocp.args.StandardRestore(abstract_state), 'meta': ocp.args.JsonRestore()}
    if data_iterator is not None:
      args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    return out['state'], out['meta']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def config_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), default=str, indent=1)
