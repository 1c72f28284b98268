"""Universal checkpoint metadata: every saved array by path, with its logical axes, global shape
and dtype, plus the model's layer layout.

After Universal Checkpointing (Lian et al., "Universal Checkpointing: Efficient and Flexible
Checkpointing for Large Scale Distributed Training", 2024): a checkpoint is written as logical,
unsharded-in-meaning arrays plus enough metadata to slice them onto any topology. Orbax already
stores global arrays; what it lacks is the logical meaning of each dimension (so a new mesh can
be derived from the model's axis names instead of the writer's shardings) and the layer layout
(one scanned stack vs one entry per layer). That is what this module records.

Paths are '/'-joined pytree keys of the TrainState: 'params/blocks/0/attn/wq',
'opt_state/1/0/mu/blocks/0/attn/wq', 'step', 'rng'. They name arrays independently of optax's
Python classes, of the mesh and of the process count.
"""

import dataclasses
import json
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

VERSION = 1
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


def path_of(keys) -> str:
  return SEP.join(key_name(k) for k in keys)


def flatten(tree) -> dict[str, Any]:
  """{path: leaf} for every leaf of `tree`."""
  return {path_of(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten_like(flat: dict[str, Any], like) -> Any:
  """Puts `flat`'s leaves into `like`'s structure, matching by path."""
  paths = [path_of(p) for p, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
  return jax.tree.unflatten(jax.tree.structure(like), [flat[p] for p in paths])


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
  is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
  opt_axes = optax.tree_map_params(
      setup.tx, lambda _, a: a, setup.abstract.opt_state, setup.param_axes,
      transform_non_params=lambda _: None, is_leaf=is_axes)
  axes_tree = setup.abstract.replace(step=None, params=setup.param_axes, opt_state=opt_axes,
                                     rng=None)
  axes = {}
  for p, a in jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=lambda x: x is None
                                                   or is_axes(x))[0]:
    axes[path_of(p)] = a
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
  return {p: ArrayInfo.from_json(d) for p, d in meta['arrays'].items()}
