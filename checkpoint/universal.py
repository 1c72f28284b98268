"""Save a TrainState universally; restore it onto whatever mesh, layout and dtype the NEW config
asks for.

Restore: read the checkpoint's metadata, plan every target array from it (checkpoint/layout.py;
all mismatches are raised here, before any array is read), read each checkpoint array straight
into the sharding the new mesh gives its logical axes, then (only when the layout or dtype
differs) build the target arrays under jit with the target shardings. The writer's mesh and
process count are never consulted.
"""

import json
import logging
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding

from checkpoint import layout, metadata
from checkpoint.manager import Checkpointer, CheckpointError
from parallelism import rules as rules_lib

log = logging.getLogger('loomax')


def save_state(ckpt: Checkpointer, step: int, state, meta: dict[str, Any],
               data_states: dict[int, dict] | None, *, force: bool = False) -> bool:
  return ckpt.save(step, metadata.flatten(state), meta, data_states, force=force)


def source_targets(src: dict[str, metadata.ArrayInfo], needed: set[str],
                   rules, mesh: Mesh,
                   reuse: dict[str, NamedSharding]) -> dict[str, jax.ShapeDtypeStruct]:
  """Where each needed checkpoint array is read to: the sharding its own logical axes get on the
  new mesh (the target's sharding when the array is copied as is)."""
  out = {}
  for path in sorted(needed):
    info = src[path]
    sharding = reuse.get(path) or rules_lib.named_sharding(info.shape, info.axes, rules, mesh,
                                                           f'checkpoint array {path}')
    out[path] = jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sharding)
  return out


def read_into(ckpt: Checkpointer, step: int, src: dict[str, metadata.ArrayInfo],
              dst: dict[str, metadata.ArrayInfo], dst_shardings: dict[str, NamedSharding],
              rules, mesh: Mesh) -> dict[str, jax.Array]:
  """Target arrays {path: array} (sharded as `dst_shardings`) from checkpoint arrays `src`."""
  p = layout.plan(src, dst)
  reuse = {s.paths[0]: dst_shardings[path] for path, s in p.items() if s.kind == 'copy'}
  needed = {q for s in p.values() for q in s.paths}
  targets = source_targets(src, needed, rules, mesh, reuse)
  arrays = ckpt.read_arrays(step, targets)
  if layout.is_identity(p, src, dst):
    return arrays
  convert = jax.jit(lambda a: layout.apply(p, a, dst),
                    out_shardings={path: dst_shardings[path] for path in p})
  return convert(arrays)


def config_changes(saved: dict[str, Any], config: ml_collections.ConfigDict,
                   ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (checkpoint's value, new value)} for every key that differs."""
  now = json.loads(json.dumps(config.to_dict(), default=str))
  a, b = _flat_keys(saved), _flat_keys(now)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k) and k not in ignore}


def _flat_keys(d: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat_keys(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def restore_state(ckpt: Checkpointer, step: int, config: ml_collections.ConfigDict, setup,
                  mesh: Mesh) -> tuple[Any, dict[str, Any], dict[int, dict] | None]:
  """(TrainState on `mesh`, the checkpoint's meta, per-process data states) for `config`."""
  meta = ckpt.read_meta(step)
  if 'opt_state' not in meta.get('items', ()):
    raise CheckpointError(f'{ckpt.step_dir(step)}: holds no optimizer state (written with '
                          '--params-only?); it cannot resume training (use init_from= to '
                          'start from its parameters with a fresh optimizer)')
  src = metadata.arrays_of(meta)
  dst = metadata.state_arrays(setup)
  shardings = metadata.flatten(setup.shardings)
  try:
    arrays = read_into(ckpt, step, src, dst, shardings, config.parallelism.rules, mesh)
  except layout.CheckpointMismatch as e:
    raise _name_optimizer_keys(e, meta['config'], config) from e
  state = metadata.unflatten_like(arrays, setup.abstract)
  if meta['layout'] != metadata.layout_of(config):
    log.info('converted layer layout %s -> %s', meta['layout'], metadata.layout_of(config))
  return state, meta, ckpt.read_data(step)


def restore_params(ckpt: Checkpointer, step: int, config: ml_collections.ConfigDict, setup,
                   mesh: Mesh) -> tuple[dict[str, jax.Array], dict[str, Any]]:
  """({path: array} of the parameters only, sharded for `config`; the checkpoint's meta)."""
  meta = ckpt.read_meta(step)
  src = {p: i for p, i in metadata.arrays_of(meta).items() if metadata.item_of(p) == 'params'}
  dst = {p: i for p, i in metadata.state_arrays(setup).items()
         if metadata.item_of(p) == 'params'}
  shardings = {p: s for p, s in metadata.flatten(setup.shardings).items() if p in dst}
  return read_into(ckpt, step, src, dst, shardings, config.parallelism.rules, mesh), meta


def _name_optimizer_keys(error: layout.CheckpointMismatch, saved: dict,
                         config: ml_collections.ConfigDict) -> layout.CheckpointMismatch:
  """A mismatch in the optimizer state is blamed on the optimizer keys that changed."""
  if 'opt_state' not in str(error).split(':', 1)[0]:
    return error
  changed = {k: v for k, v in config_changes(saved, config).items()
             if k.startswith('optimizer.')}
  which = ', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items()) or 'none changed'
  return layout.CheckpointMismatch(f'{error} [the optimizer state does not fit this '
                                   f'optimizer; optimizer keys changed: {which}]')
