"""Hybrid data parallelism's device side below the training step: the pool's groups as a
context axis, and the collectives, attention and recurrence that run inside every group.

ByteScale (Ge et al., 2025), section 4: the pool (mesh data x fsdp x context) is cut per
micro-batch into consecutive groups (a layout such as (4, 2, 1, 1)); each group runs the
zigzag ring attention (`parallelism/context/ring.py`, reused) and, for recurrent layers, the
context-parallel scan and conv halo (`parallelism/context/scan.py`) among its own members,
over a `GroupAxis` instead of the context mesh axis. The planner is `planner.py`; the step
that runs a plan is `training/hybrid/executor.py`.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from parallelism.context import ring
from parallelism.context import scan as context_scan
from parallelism.context.sharded import ContextAxis
from parallelism.hybrid import planner as hybrid_dp

POOL = ('data', 'fsdp', 'context')  # the mesh axes that form the pool, in device order


@dataclasses.dataclass(frozen=True)
class GroupAxis(ContextAxis):
  """A context axis made of the pool's groups: consecutive devices cut into groups of the
  sizes in `layout` (default: every group `size` devices). Every collective is one static
  permutation applied inside every group at once, so the context code written for a mesh axis
  (ring, scan, conv halo) runs per group unchanged. With mixed sizes, `size` is the largest
  group: the ring takes that many steps, a block going round a smaller group again is hidden
  (`visible`), and dK/dV still come home because every size divides the largest."""
  pool: int = 1
  layout: tuple[int, ...] = ()

  def groups(self) -> tuple[int, ...]:
    return self.layout or hybrid_dp.uniform_layout(self.size, self.pool)

  def _table(self, values) -> jax.Array:
    """A per-device value from a static [pool] table."""
    return jnp.asarray(np.asarray(values, np.int32))[jax.lax.axis_index(self._name())]

  def _members(self):
    """(group start, group size) of every pool device."""
    start, size, at = [], [], 0
    for g in self.groups():
      start += [at] * g
      size += [g] * g
      at += g
    return start, size

  def index(self) -> jax.Array:
    if len(set(self.groups())) == 1:
      return jax.lax.axis_index(self._name()) % self.size
    start, _ = self._members()
    return jax.lax.axis_index(self._name()) - self._table(start)

  def send(self, tree, pairs):
    """ppermute along (source, destination) member pairs, in every group (taken modulo the
    group's size); members no pair reaches receive zeros."""
    if self.size == 1:
      return tree
    pool_pairs, at = [], 0
    for g in self.groups():
      pool_pairs += sorted({(at + s % g, at + d % g) for s, d in pairs})
      at += g
    return jax.tree.map(lambda x: jax.lax.ppermute(x, self._name(), pool_pairs), tree)

  def shift(self, tree, offset: int):
    return self.send(tree, [(j, j + offset) for j in range(self.size)])

  def visible(self, kv, hop):
    if len(set(self.groups())) == 1:
      return kv
    _, size = self._members()
    k, v, seg, pos = kv
    # Segment -1 matches no query (padding is 0), so the kernel skips the whole block.
    return k, v, jnp.where(hop < self._table(size), seg, -1), pos

  def all_gather(self, x, axis: int):
    """Tiled all-gather over the group's members in member order, by g-1 shifts (meant for
    small arrays, such as the scan's per-piece summaries; uniform layouts only)."""
    if self.size == 1:
      return x
    g = self.size
    got = jnp.stack([x] + [self.shift(x, o) for o in range(1, g)])  # got[o]: from member me-o
    src = (self.index() - jnp.arange(g)) % g
    ordered = jnp.take(got, jnp.argsort(src), axis=0)              # [g, ...] by member
    ordered = jnp.moveaxis(ordered, 0, axis)
    shape = list(x.shape)
    shape[axis] *= g
    return ordered.reshape(shape)


@dataclasses.dataclass(frozen=True)
class GroupRecurrence:
  """`ssm.Recurrence` for a document split over a group (per device, inside the pool's
  shard_map): the context-parallel scan and conv halo over a `GroupAxis`, zigzag layout."""
  axis: GroupAxis
  scan_fn: Any
  chunk: int

  def conv(self, x_BLE, w_WE, b_E, segment_ids_BL):
    return context_scan.local_conv(x_BLE, w_WE, b_E, segment_ids_BL, axis=self.axis,
                                   zigzag=True)

  def scan(self, x_BLE, dt_BLE, A_EN, B_BLN, C_BLN, *, segment_ids_BL):
    return context_scan.local_scan(x_BLE, dt_BLE, A_EN, B_BLN, C_BLN, segment_ids_BL,
                                   axis=self.axis, zigzag=True, scan_fn=self.scan_fn,
                                   chunk=self.chunk)


def check_whole_group_layout(g: int, buffers: dict[str, np.ndarray]) -> None:
  """Refuses g > 1 buffers not laid out as `whole_groups=True` makes them: in every group,
  either nothing or one document whose member m holds tokens [m h, (m+1) h) and
  [(2g-1-m) h, (2g-m) h), h = capacity / 2."""
  seg, pos = np.asarray(buffers['segment_ids']), np.asarray(buffers['positions'])
  n, C = seg.shape
  h = C // 2
  want = np.stack([np.r_[m * h:(m + 1) * h, (2 * g - 1 - m) * h:(2 * g - m) * h]
                   for m in range(g)])
  for j in range(0, n, g):
    s, p = seg[j:j + g], pos[j:j + g]
    if not s.any():
      continue
    ids = np.unique(s[s > 0])
    if len(ids) != 1 or not (p == want).all() or not (C % 2 == 0):
      raise ValueError(
          f'hybrid_dp: a group of {g} devices holds buffers not planned with whole_groups=True, '
          'which this model (recurrent layers over token order) needs: make the plan with '
          'hybrid_dp.plan(..., whole_groups=True)')


def group_attend(layout: tuple[int, ...], pool: int, block_q: int, block_kv: int):
  """The per-device `AttendFn` for a layout: the zigzag ring among each group's members."""
  local = ring.make_local(block_q, block_kv, zigzag=True)
  axis = GroupAxis(POOL, max(layout), pool, layout)

  def attend(q_BLHD, k_BSKD, v_BSKD, *, q_segment_ids, kv_segment_ids, q_positions,
             kv_positions, causal, window=0):
    return local(q_BLHD, k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids, q_positions,
                 kv_positions, axis=axis, causal=causal, window=int(window))

  return attend


def layout_of(key, pool: int) -> tuple[int, ...]:
  """The layout tuple of an executor key: g (every group g devices) or the tuple itself."""
  layout = hybrid_dp.uniform_layout(key, pool) if isinstance(key, (int, np.integer)) else \
      tuple(int(g) for g in key)
  if sum(layout) != pool or min(layout) < 1 or any(max(layout) % g for g in layout):
    raise ValueError(f'hybrid_dp: layout {layout} does not cut the pool of {pool} devices into '
                     'groups whose sizes divide the largest')
  return layout


def pool_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in POOL]))
