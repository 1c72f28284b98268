"""Shared K/V under context parallelism: gather once per step, every reader attends locally.

SambaY's cross-decoder layers all attend to the one full-attention layer's K/V. Run through
the context attention, each of them would move those same K/V around the ring again (and
their gradients back). Here `gather` all-gathers K, V and their segment ids and positions
over the context axis once per forward pass (its transpose, one reduce-scatter of the summed
dK/dV of all readers, runs once per backward pass), and `attend` runs the single-device
kernel on (local queries) x (all keys) inside `shard_map`, with no communication. Masks are
by positions, so the zigzag layout needs nothing more. Cost: every device holds the whole
sequence's K/V for the shared layer (kv heads x head dim x L x 2), as all-gather context
parallelism does for every layer.

The gathered K/V carry a leading axis of one copy per context device ([N, B, S, K, D], each
device holding its own), so they are opaque to the model: it only passes them to `attend`.
"""

import dataclasses

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from modeling import axes as ax
from modeling.attention import AttendFn
from parallelism import rules as rules_lib


@dataclasses.dataclass(frozen=True)
class GatheredKV:
  """`modeling.shared_kv.SharedKV` over the mesh's context axes."""
  mesh: Mesh
  rules: tuple
  kernel: AttendFn

  def __post_init__(self):
    object.__setattr__(self, 'rules', tuple(
        (n, tuple(a) if isinstance(a, list) else a) for n, a in self.rules))

  def _specs(self):
    # The gathered arrays get a leading axis over the context devices, one copy each
    # ([N, B, S, ...]), rather than being replicated: each device's cotangent is then its own
    # partial sum, and the all-gather's transpose (one reduce-scatter) adds them up. (As a
    # replicated value, autodiff would first all-reduce the cotangent at every reader.)
    q = rules_lib.logical_to_spec((ax.BATCH, ax.LENGTH, ax.ACT_HEADS, None), self.rules,
                                  self.mesh)
    names = () if q[1] is None else ((q[1],) if isinstance(q[1], str) else tuple(q[1]))
    axis = names[0] if len(names) == 1 else names
    return q, P(q[1], q[0], None, q[2], None), P(q[0], q[1]), P(q[1], q[0], None), axis

  def gather(self, k_BSKD, v_BSKD, segment_ids_BS, positions_BS):
    q_spec, full, ids, full_ids, axis = self._specs()
    heads = rules_lib.mesh_axes_size(self.mesh, q_spec[2])
    if k_BSKD.shape[2] % heads:   # composition only picks this path when they divide
      raise ValueError(f'shared K/V: {k_BSKD.shape[2]} kv heads over {heads} head shards')
    g = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)[None]
    return jax.shard_map(lambda *xs: tuple(g(x) for x in xs), mesh=self.mesh,
                         in_specs=(q_spec, q_spec, ids, ids),
                         out_specs=(full, full, full_ids, full_ids), check_vma=False)(
        k_BSKD, v_BSKD, segment_ids_BS, positions_BS)

  def attend(self, q_BLHD, k_BSKD, v_BSKD, *, q_segment_ids, kv_segment_ids, q_positions,
             kv_positions, causal, window=0):
    q_spec, full, ids, full_ids, _ = self._specs()

    def body(q, k, v, qs, ks, qp, kp):
      k, v, ks, kp = k[0], v[0], ks[0], kp[0]
      return self.kernel(q, k, v, q_segment_ids=qs, kv_segment_ids=ks, q_positions=qp,
                         kv_positions=kp, causal=causal, window=window)

    return jax.shard_map(body, mesh=self.mesh,
                         in_specs=(q_spec, full, full, ids, full_ids, ids, full_ids),
                         out_specs=q_spec, check_vma=False)(
        q_BLHD, k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
