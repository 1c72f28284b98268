"""What every context-parallel attention shares: the shard_map around the attention seam,
the context axis seen from inside it, and the log-sum-exp merge of partial results.

Specs come from `parallelism.rules` (logical names 'batch', 'length', 'act_heads'), so the
same op composes with batch sharded over (data, fsdp) and heads over tensor: only the
mesh axes that 'length' maps to carry the ring.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from modeling import axes as ax
from modeling.masking import MASK_VALUE
from parallelism import rules as rules_lib


@dataclasses.dataclass(frozen=True)
class ContextAxis:
  """The mesh axes that split the sequence, seen from inside shard_map."""
  names: tuple[str, ...]
  size: int

  def _name(self):
    return self.names[0] if len(self.names) == 1 else self.names

  def index(self) -> jax.Array:
    return jax.lax.axis_index(self._name()) if self.names else jnp.int32(0)

  def send(self, tree, pairs):
    """ppermute along (source, destination) pairs; devices no pair reaches receive zeros."""
    if self.size == 1:  # nothing to send (a context axis of one device)
      return tree
    pairs = [(s % self.size, d % self.size) for s, d in pairs]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, self._name(), pairs), tree)

  def shift(self, tree, offset: int):
    """Every device sends to (index + offset) mod size."""
    return self.send(tree, [(j, j + offset) for j in range(self.size)])

  def send_packed(self, tree, pairs):
    """`send` of a whole pytree as one buffer: one collective-permute instead of one per leaf
    (XLA:GPU keeps about one collective in flight, so separate permutes would serialise)."""
    if self.size == 1:
      return tree
    buffer, unpack = pack(tree)
    return unpack(self.send(buffer, pairs))

  def shift_packed(self, tree, offset: int):
    """`shift` of a whole pytree as one buffer (see `send_packed`)."""
    return self.send_packed(tree, [(j, j + offset) for j in range(self.size)])

  def all_gather(self, x, axis: int):
    return jax.lax.all_gather(x, self._name(), axis=axis, tiled=True) if self.names else x

  def visible(self, kv, hop: int | jax.Array):
    """The K/V block (k, v, segment ids, positions) a ring step `hop` hops from its owner
    attends to: all of it here. An axis whose devices sit in rings shorter than `size` (hybrid
    DP's mixed layouts) hides blocks that came around again."""
    del hop
    return kv


def pack(tree):
  """(one flat uint8 buffer holding every leaf's bytes, the function that restores the tree).
  Bitcasts are free; the concatenation is one copy of bytes a collective moves anyway."""
  leaves, treedef = jax.tree.flatten(tree)
  meta = [(x.shape, x.dtype) for x in leaves]
  as_bytes = lambda x: jax.lax.bitcast_convert_type(
      x.astype(jnp.uint8) if x.dtype == jnp.bool_ else x, jnp.uint8).reshape(-1)
  buffer = jnp.concatenate([as_bytes(x) for x in leaves])

  def unpack(buf):
    out, at = [], 0
    for shape, dtype in meta:
      size = dtype.itemsize
      n = size * (int(np.prod(shape)) if shape else 1)
      part = buf[at:at + n]
      at += n
      if dtype == jnp.bool_:
        out.append(part.reshape(shape).astype(jnp.bool_))
      elif size == 1:
        out.append(jax.lax.bitcast_convert_type(part, dtype).reshape(shape))
      else:
        out.append(jax.lax.bitcast_convert_type(part.reshape(*shape, size), dtype))
    return jax.tree.unflatten(treedef, out)

  return buffer, unpack


def merge(o_a, lse_a, o_b, lse_b):
  """Combines attention over two disjoint key sets (float32): l = logaddexp, o = weighted sum."""
  lse = jnp.logaddexp(lse_a, lse_b)
  w_a, w_b = jnp.exp(lse_a - lse)[..., None], jnp.exp(lse_b - lse)[..., None]
  return o_a * w_a + o_b * w_b, lse


def masked_lse(keep, lse):
  """`lse` where `keep`, else "no keys": the partial then adds nothing in `merge`."""
  return jnp.where(keep, lse, MASK_VALUE)


def halves(x, axis: int = 1):
  n = x.shape[axis] // 2
  return jax.lax.slice_in_dim(x, 0, n, axis=axis), jax.lax.slice_in_dim(x, n, 2 * n, axis=axis)


def _axis_names(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


LocalFn = Callable[..., jax.Array]


def shard_attend(local_fn: LocalFn, mesh: Mesh, rules):
  """An `AttendFn` running `local_fn(q, k, v, qseg, kseg, qpos, kpos, *, axis, causal, window)`
  on each device's shard: batch and heads as the rules say, length over the context axes."""

  def attend(q_BLHD, k_BSKD, v_BSKD, *, q_segment_ids, kv_segment_ids, q_positions,
             kv_positions, causal, window=0):
    q_spec = rules_lib.logical_to_spec((ax.BATCH, ax.LENGTH, ax.ACT_HEADS, None), rules, mesh)
    rules_lib.check_divisible(q_BLHD.shape, q_spec, mesh, 'attention queries')
    rules_lib.check_divisible(k_BSKD.shape[:2], q_spec[:2], mesh, 'attention keys')
    H, K = q_BLHD.shape[2], k_BSKD.shape[2]
    if K % rules_lib.mesh_axes_size(mesh, q_spec[2]):
      # Fewer kv heads than tensor shards: give each query head its own copy, so every
      # shard holds the kv heads its query heads use (autodiff sums the copies' gradients).
      k_BSKD, v_BSKD = (jnp.repeat(x, H // K, axis=2) for x in (k_BSKD, v_BSKD))
    ids_spec = P(q_spec[0], q_spec[1])
    names = _axis_names(q_spec[1])
    axis = ContextAxis(names, rules_lib.mesh_axes_size(mesh, q_spec[1]))

    def body(q, k, v, qseg, kseg, qpos, kpos):
      return local_fn(q, k, v, qseg, kseg, qpos, kpos, axis=axis, causal=causal,
                      window=int(window))

    # check_vma=False: the bodies branch on the device index (lax.cond, jnp.where) and use
    # partial permutations; their custom VJPs do their own collectives, so JAX's
    # varying-manual-axes tracking has nothing to add.
    return jax.shard_map(body, mesh=mesh,
                         in_specs=(q_spec, q_spec, q_spec, ids_spec, ids_spec, ids_spec, ids_spec),
                         out_specs=q_spec, check_vma=False)(
        q_BLHD, k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids, q_positions, kv_positions)

  return attend
