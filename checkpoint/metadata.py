"""Universal checkpoint metadata: every saved array by path, with its logical axes, global shape
and dtype, plus the model's layer layout.

After Universal Checkpointing (Lian et al., "Universal Checkpointing: Efficient and Flexible
Checkpointing for Large Scale Distributed Training", 2024): a checkpoint is written as logical,
unsharded-in-meaning arrays plus enough metadata to slice them onto any topology. Orbax already
stores global arrays; what it lacks is the logical meaning of each dimension (so a new mesh can
be derived from the model's axis names instead of the writer's shardings) and the layer layout
(one scanned stack vs one entry per layer). That is what this module records.

Paths are '/'-joined pytree keys of the TrainState: 'params/blocks/0/attn/wq',
'opt_state/adam/mu/blocks/0/attn/wq', 'step', 'rng'. They name arrays independently of the
mesh and of the process count. Optimizer state is keyed by the optax state's name and field
plus the parameter path (the per-parameter "atoms" of Universal Checkpointing), never by its
position in the optax chain: adding or removing gradient clipping changes the chain but not a
single name, so the moments restore. (Version 1 named them by chain position:
'opt_state/1/0/mu/...'; see `upgrade_v1`.)
"""

import dataclasses
import json
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

VERSION = 2  # 2: optimizer state named by state and field, not chain position
SEP = '/'
LAYERS = 'layers'  # the logical axis of a scanned layer stack (modeling/axes.py)
ITEMS = ('params', 'opt_state', 'train')  # Orbax items holding arrays; 'train' = step and rng


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
  shape: tuple[int, ...]
  dtype: str
  axes: tuple[str | None, ...]  # logical axis per dimension (None = never sharded)

  def to_json(self) -> dict:
    return {'shape': list(self.shape), 'dtype': self.dtype, 'axes': list(self.axes)}

  @classmethod
  def from_json(cls, d: dict) -> 'ArrayInfo':
    return cls(tuple(d['shape']), d['dtype'], tuple(d['axes']))

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def key_name(key) -> str:
  for attr in ('key', 'idx', 'name'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  raise TypeError(f'unsupported pytree key {key!r}')


def state_name(cls: type) -> str:
  """optax state class -> short name: ScaleByAdamState -> 'adam', MaskedState -> 'masked'."""
  name = cls.__name__
  name = name[len('ScaleBy'):] if name.startswith('ScaleBy') else name
  name = name[:-len('State')] if name.endswith('State') and len(name) > 5 else name
  return name.lower()


def _is_named_tuple(x) -> bool:
  return isinstance(x, tuple) and hasattr(x, '_fields')


def _canonical(root, keys) -> str:
  """The path of one leaf: positions inside plain tuples (optax chains) are dropped, a named
  state contributes its short name and field."""
  parts, node = [], root
  for k in keys:
    if node is None:
      parts.append(key_name(k))
      continue
    if isinstance(k, jax.tree_util.SequenceKey) and isinstance(node, tuple) \
        and not _is_named_tuple(node):
      node = node[k.idx]  # a chain position: not part of the name
    elif isinstance(k, jax.tree_util.GetAttrKey) and _is_named_tuple(node):
      parts += [state_name(type(node)), k.name]
      node = getattr(node, k.name)
    else:
      parts.append(key_name(k))
      try:
        node = (getattr(node, k.name) if isinstance(k, jax.tree_util.GetAttrKey)
                else node[k.key] if isinstance(k, jax.tree_util.DictKey) else node[k.idx])
      except (AttributeError, KeyError, IndexError, TypeError):
        node = None
  return SEP.join(parts)


def paths_of(tree, is_leaf=None) -> list[tuple[str, Any]]:
  """[(path, leaf)] in flattening order; raises if two leaves would share a name."""
  out = [(_canonical(tree, p), leaf)
         for p, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]
  seen = set()
  for p, _ in out:
    if p in seen:
      raise ValueError(f'two arrays of the train state would be saved as {p!r} (an optax chain '
                       'with two states of the same kind?)')
    seen.add(p)
  return out


def flatten(tree) -> dict[str, Any]:
  """{path: leaf} for every leaf of `tree`."""
  return dict(paths_of(tree))


def unflatten_like(flat: dict[str, Any], like) -> Any:
  """Puts `flat`'s leaves into `like`'s structure, matching by path."""
  return jax.tree.unflatten(jax.tree.structure(like), [flat[p] for p, _ in paths_of(like)])


def nest(flat: dict[str, Any]) -> dict[str, Any]:
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}} (what is handed to Orbax: plain string-keyed dicts)."""
  out: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = out
    *parents, last = path.split(SEP)
    for k in parents:
      node = node.setdefault(k, {})
    node[last] = leaf
  return out


def item_of(path: str) -> str:
  head = path.split(SEP, 1)[0]
  return head if head in ('params', 'opt_state') else 'train'


def split_items(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """{path: x} -> {item: {path inside the item: x}}."""
  out: dict[str, dict[str, Any]] = {}
  for path, leaf in flat.items():
    item = item_of(path)
    inner = path if item == 'train' else path.split(SEP, 1)[1]
    out.setdefault(item, {})[inner] = leaf
  return out


def join_items(items: dict[str, dict[str, Any]]) -> dict[str, Any]:
  out = {}
  for item, flat in items.items():
    for inner, leaf in flat.items():
      out[inner if item == 'train' else f'{item}{SEP}{inner}'] = leaf
  return out


def state_arrays(setup) -> dict[str, ArrayInfo]:
  """ArrayInfo for every array of a ModelSetup's TrainState (optimizer moments get the axes of
  their parameter; counters and keys have none)."""
  is_axes = lambda x: (isinstance(x, tuple) and not _is_named_tuple(x)
                       and all(a is None or isinstance(a, str) for a in x))
  opt_axes = optax.tree_map_params(
      setup.tx, lambda _, a: a, setup.abstract.opt_state, setup.param_axes,
      transform_non_params=lambda _: None, is_leaf=is_axes)
  axes_tree = setup.abstract.replace(step=None, params=setup.param_axes, opt_state=opt_axes,
                                     rng=None)
  axes = dict(paths_of(axes_tree, is_leaf=lambda x: x is None or is_axes(x)))
  out = {}
  for path, leaf in flatten(setup.abstract).items():
    a = axes.get(path)
    out[path] = ArrayInfo(tuple(leaf.shape), np.dtype(leaf.dtype).name,
                          tuple(a) if a is not None else (None,) * len(leaf.shape))
  return out


def layout_of(config: ml_collections.ConfigDict) -> str:
  return 'scan' if config.model.scan_layers else 'unrolled'


def describe(config: ml_collections.ConfigDict, arrays: dict[str, ArrayInfo], mesh=None,
             process_count: int = 1) -> dict[str, Any]:
  """The JSON 'meta' item: resolved config, layout, every array, and who wrote it (informational:
  nothing on restore depends on the writer's mesh or process count)."""
  return {
      'universal_checkpoint_version': VERSION,
      'config': json.loads(json.dumps(config.to_dict(), default=str)),
      'layout': layout_of(config),
      'num_layers': int(config.model.num_layers),
      'arrays': {p: info.to_json() for p, info in arrays.items()},
      'written_by': {'mesh': dict(mesh.shape) if mesh is not None else None,
                     'process_count': process_count},
  }


def arrays_of(meta: dict[str, Any]) -> dict[str, ArrayInfo]:
  """Every array of a checkpoint by its (current) name; see `stored_names` for reading."""
  names = current_names(meta)
  return {names.get(p, p): ArrayInfo.from_json(d) for p, d in meta['arrays'].items()}


def current_names(meta: dict[str, Any]) -> dict[str, str]:
  """{name as stored: name today} for the arrays whose naming changed since the checkpoint's
  version. Version 1 named optimizer state by chain position ('opt_state/1/0/mu/...'); the
  only optimizer version 1 ever wrote was [optional clip_by_global_norm] + adamw, whose
  states are ScaleByAdamState(count, mu, nu), MaskedState, ScaleByScheduleState(count)."""
  if meta.get('universal_checkpoint_version', 1) >= 2:
    return {}
  out, counts = {}, []
  for path in meta['arrays']:
    parts = path.split(SEP)
    if parts[0] != 'opt_state':
      continue
    k = 1
    while k < len(parts) and parts[k].isdigit():
      k += 1
    field = parts[k] if k < len(parts) else ''
    if field in ('mu', 'nu'):
      out[path] = SEP.join(['opt_state', 'adam', *parts[k:]])
    elif field == 'count':
      counts.append(path)
  counts.sort(key=lambda p: [int(x) for x in p.split(SEP)[1:-1]])  # chain order
  for path, owner in zip(counts, ('adam', 'schedule')):
    out[path] = SEP.join(['opt_state', owner, 'count'])
  return out


def stored_names(meta: dict[str, Any]) -> dict[str, str]:
  """{name today: name as stored} (only where they differ)."""
  return {new: old for old, new in current_names(meta).items()}
