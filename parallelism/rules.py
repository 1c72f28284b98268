"""Logical axis rules: turn the names model code uses into shardings on a mesh.

`config.parallelism.rules` is a short list of (logical name, mesh axes). A parameter or
activation annotated ('embed', 'mlp') under rules {embed: fsdp, mlp: tensor} becomes
PartitionSpec('fsdp', 'tensor'). Everything that shards by name goes through here.
"""

import math
from typing import Any, Iterable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Any]]

# Logical axes whose dimension is replicated, not refused, when the mesh cannot divide it:
# with more tensor shards than key/value heads (tensor=4, num_kv_heads=2) every shard keeps
# all K/V heads, as MaxText does; the attention seam repeats them per query head
# (parallelism/context/sharded.py) and XLA slices what each shard needs.
REPLICATE_IF_INDIVISIBLE = frozenset({'kv_heads'})


def _as_tuple(mesh_axes) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def rules_dict(rules: Iterable) -> dict[str, tuple[str, ...]]:
  out = {}
  for entry in rules:
    logical, mesh_axes = entry
    if logical in out:
      raise ValueError(f'parallelism.rules names logical axis {logical!r} twice')
    out[logical] = _as_tuple(mesh_axes)
  return out


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules, mesh: Mesh) -> P:
  """PartitionSpec for one array; mesh axes of size 1 are dropped (they shard nothing)."""
  table = rules_dict(rules)
  used: set[str] = set()
  spec = []
  for name in logical_axes:
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(f'logical axis {name!r} has no entry in parallelism.rules '
                       f'(known: {sorted(table)})')
    axes = tuple(a for a in table[name] if mesh.shape.get(a, 1) > 1)
    missing = [a for a in table[name] if a not in mesh.shape]
    if missing:
      raise ValueError(f'parallelism.rules maps {name!r} to unknown mesh axes {missing}')
    clash = used.intersection(axes)
    if clash:
      raise ValueError(f'logical axes {tuple(logical_axes)} map mesh axis {sorted(clash)} twice')
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*spec)


def mesh_axes_size(mesh: Mesh, entry) -> int:
  return math.prod(mesh.shape[a] for a in _as_tuple(entry))


def check_divisible(shape: Sequence[int], spec: P, mesh: Mesh, what: str) -> None:
  for dim, (size, entry) in enumerate(zip(shape, spec)):
    n = mesh_axes_size(mesh, entry)
    if size % n:
      raise ValueError(f'{what}: dimension {dim} of size {size} is not divisible by mesh '
                       f'{entry}={n} (shape {tuple(shape)}); change parallelism.rules or the mesh')


def replicate_indivisible(shape: Sequence[int], logical_axes, spec: P, mesh: Mesh) -> P:
  """`spec` with the REPLICATE_IF_INDIVISIBLE dimensions the mesh cannot divide replicated."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  for dim, (size, name) in enumerate(zip(shape, logical_axes)):
    if name in REPLICATE_IF_INDIVISIBLE and size % mesh_axes_size(mesh, entries[dim]):
      entries[dim] = None
  return P(*entries)


def named_sharding(shape, logical_axes, rules: Rules, mesh: Mesh, what: str) -> NamedSharding:
  spec = logical_to_spec(logical_axes, rules, mesh)
  spec = replicate_indivisible(shape, logical_axes, spec, mesh)
  check_divisible(shape, spec, mesh, what)
  return NamedSharding(mesh, spec)


def tree_shardings(abstract_tree, axes_tree, rules: Rules, mesh: Mesh):
  """Shardings for a pytree of arrays given a matching pytree of logical-axis tuples."""
  paths_and_leaves = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  axes_leaves = jax.tree.leaves(axes_tree, is_leaf=lambda x: isinstance(x, tuple))
  if len(axes_leaves) != len(paths_and_leaves):
    raise ValueError('logical-axis tree does not match the parameter tree')
  out = [named_sharding(leaf.shape, axes, rules, mesh, jax.tree_util.keystr(path))
         for (path, leaf), axes in zip(paths_and_leaves, axes_leaves)]
  return jax.tree.unflatten(jax.tree.structure(abstract_tree), out)


def make_constrain(mesh: Mesh, rules: Rules):
  """The activation `Constrain` handed to models: a sharding constraint by logical names."""

  def constrain(x: jax.Array, logical_axes) -> jax.Array:
    sharding = named_sharding(x.shape, tuple(logical_axes), rules, mesh, 'activation')
    return jax.lax.with_sharding_constraint(x, sharding)

  return constrain


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
