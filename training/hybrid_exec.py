"""Runs a hybrid-data-parallel plan (`hybrid_dp.py`): one compiled program per group size g.

ByteScale (Ge et al., 2025), section 4: every device of the pool holds a model replica; a
micro-batch of layout g splits the pool into aligned groups of g devices, and each group runs
the zigzag ring attention (`context/ring.py`, reused unchanged) among its own members only: the
ring's ppermute cycles inside each group (a static permutation, so JAX compiles it once per g).
For g = 1 the ring has one step and sends nothing. The whole model runs under one shard_map over
the pool (each device its [1, C] tokens); gradients stay per device while micro-batches of any
layout accumulate, and are summed once per step, then normalised by the global token count, so
the update equals plain data parallelism on the same documents.

Recurrent layers (SambaY's Mamba: a scan and a causal conv over token order) run inside each
group with the context-parallel scan and conv halo (`context/scan.py`), over a `GroupAxis`
instead of the context mesh axis. That code needs the zigzag context layout (two halves per
device), so for such models the plan is made with `whole_groups=True` (`whole_groups` below):
a split document fills its group alone, and `gradients` refuses buffers laid out otherwise.

Built variant: every micro-batch has one group size for the whole pool (micro-batches of
different g run one after another), so the program count is the number of distinct g + 1 (the
update). Mixed-size layouts in one micro-batch are not built.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from modeling import registry, ssm
from modeling.transformer import Runtime
from parallelism import hybrid_dp
from parallelism.context import ring
from parallelism.context import scan as context_scan
from parallelism.context.sharded import ContextAxis
from training import step as step_lib
from training.composition import check_token_order
from training.state import ModelSetup, TrainState

POOL = ('data', 'context')  # the mesh axes that form the pool, in device order


@dataclasses.dataclass(frozen=True)
class GroupAxis(ContextAxis):
  """A context axis of `size` devices: the aligned groups of `size` consecutive pool devices.
  Every collective is one static permutation applied inside every group at once, so the
  context code written for a mesh axis (ring, scan, conv halo) runs per group unchanged."""
  pool: int = 1

  def index(self) -> jax.Array:
    return jax.lax.axis_index(self._name()) % self.size

  def send(self, tree, pairs):
    """ppermute along (source, destination) member pairs, in every group; members no pair
    reaches receive zeros."""
    if self.size == 1:
      return tree
    g = self.size
    pool_pairs = [(b + s % g, b + d % g) for b in range(0, self.pool, g) for s, d in pairs]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, self._name(), pool_pairs), tree)

  def shift(self, tree, offset: int):
    return self.send(tree, [(j, j + offset) for j in range(self.size)])

  def all_gather(self, x, axis: int):
    """Tiled all-gather over the group's members in member order, by g-1 shifts (meant for
    small arrays, such as the scan's per-piece summaries)."""
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


def whole_groups(config: ml_collections.ConfigDict) -> bool:
  """Whether plans for this model must give a split document its group alone
  (`hybrid_dp.plan(whole_groups=...)`): yes when it has order-dependent (recurrent) layers."""
  return bool(registry.get_family(config.model.name).order_dependent_layers)


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
          'hybrid_dp.plan(..., whole_groups=hybrid_exec.whole_groups(config))')


def group_attend(g: int, pool: int, block_q: int, block_kv: int):
  """The per-device `AttendFn` for groups of g: the zigzag ring among the group's members."""
  local = ring.make_local(block_q, block_kv, zigzag=True)
  axis = GroupAxis(POOL, g, pool)

  def attend(q_BLHD, k_BSKD, v_BSKD, *, q_segment_ids, kv_segment_ids, q_positions,
             kv_positions, causal, window=0):
    return local(q_BLHD, k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids, q_positions,
                 kv_positions, axis=axis, causal=causal, window=int(window))

  return attend


def check_config(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  h = config.parallelism.hybrid_dp
  busy = {a: mesh.shape[a] for a in ('fsdp', 'tensor') if mesh.shape[a] != 1}
  if busy:
    raise ValueError(f'parallelism.hybrid_dp.enabled needs mesh.fsdp = mesh.tensor = 1 (every '
                     f'pool device a full replica); got {busy}')
  if config.model.sliding_window:
    raise ValueError('parallelism.hybrid_dp.enabled does not support model.sliding_window')
  check_token_order(config, mesh)   # order-dependent layers without the recurrence seam: g = 1
  hybrid_dp.check_layouts(h.layouts, mesh.shape['data'] * mesh.shape['context'])


class Executor:
  """Compiled per-g gradient programs and the update, for one model on one pool mesh."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, setup: ModelSetup):
    check_config(config, mesh)
    self.config, self.mesh, self.setup = config, mesh, setup
    self.pool = mesh.shape['data'] * mesh.shape['context']
    self.capacity = int(config.parallelism.hybrid_dp.capacity)
    self.replicated = NamedSharding(mesh, P())
    self.per_device = NamedSharding(mesh, P(POOL))
    self._programs: dict[int, Any] = {}
    self._update = jax.jit(self._apply, donate_argnums=(0, 3))
    self._zeros = jax.jit(
        lambda params: jax.tree.map(lambda p: jnp.zeros((self.pool, *p.shape), p.dtype), params),
        out_shardings=self.per_device)

  @property
  def program_count(self) -> int:
    """Compiled programs in use: one per group size seen, plus the update."""
    return len(self._programs) + 1

  @property
  def whole_groups(self) -> bool:
    return whole_groups(self.config)

  def _recurrence(self, g: int):
    """None (the model's own local scan) for g = 1 or a model without recurrent layers."""
    if g == 1 or not registry.get_family(self.config.model.name).uses_recurrence_seam:
      return None
    s = self.config.model.sambay
    return GroupRecurrence(GroupAxis(POOL, g, self.pool), ssm.make_scan(s.scan_impl,
                                                                        s.scan_chunk),
                           s.scan_chunk)

  def _graphdef(self, g: int):
    a = self.config.attention
    # Shared K/V (SambaY's cross-decoder) stays None: each reader runs the group ring.
    runtime = Runtime(attend=group_attend(g, self.pool, a.block_q, a.block_kv),
                      recurrence=self._recurrence(g))
    model = nnx.eval_shape(
        lambda: registry.build_model(self.config.model, rngs=nnx.Rngs(0), runtime=runtime))
    return nnx.split(model, nnx.Param, ...)[0]

  def program(self, g: int):
    """acc, loss, count <- acc + this device's gradient of its micro-batch (no reduction)."""
    if g not in self._programs:
      graphdef = self._graphdef(g)
      grad_fn = jax.value_and_grad(
          functools.partial(step_lib.loss_sum, loss_chunk=self.config.attention.loss_chunk),
          has_aux=True)

      def body(params, acc, total, count, batch, rng):
        batch = {k: v for k, v in batch.items()}  # [1, C] per device
        (t, c), grads = grad_fn(params, graphdef, batch, rng)
        acc = jax.tree.map(lambda a, d: a + d[None], acc, grads)
        return acc, total + t[None], count + c[None]

      # check_vma=False: the ring's custom VJP does its own collectives (as in sharded.py).
      fn = jax.shard_map(body, mesh=self.mesh,
                         in_specs=(P(), P(POOL), P(POOL), P(POOL), P(POOL), P()),
                         out_specs=(P(POOL), P(POOL), P(POOL)), check_vma=False)
      self._programs[g] = jax.jit(fn, donate_argnums=(1, 2, 3))
    return self._programs[g]

  def _apply(self, state: TrainState, total, count, acc):
    # The step's one gradient reduction over the pool, then the plain-DP update.
    grads = jax.tree.map(lambda a: a.sum(0), acc)
    return step_lib.apply_gradients(self.setup, state, total.sum(), count.sum(), grads)

  def put(self, buffers: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Global [pool, C] arrays; every process holds the whole plan's buffers and hands each of
    its devices its own row (so this also works with several processes)."""
    return {k: jax.make_array_from_callback(v.shape, self.per_device, lambda idx, v=v: v[idx])
            for k, v in buffers.items()}

  def gradients(self, params, rng, micro_batches):
    """(loss sums, token counts, gradients) per device [pool, ...], summed over the
    micro-batches; `micro_batches` are (g, device buffers) pairs from `hybrid_dp.batch_buffers`."""
    acc = self._zeros(params)
    total = jax.device_put(np.zeros(self.pool, np.float32), self.per_device)
    count = jax.device_put(np.zeros(self.pool, np.float32), self.per_device)
    for k, (g, buffers) in enumerate(micro_batches):
      if g > 1 and self.whole_groups and not isinstance(next(iter(buffers.values())),
                                                        jax.Array):
        check_whole_group_layout(g, buffers)
      batch = buffers if isinstance(next(iter(buffers.values())), jax.Array) else self.put(buffers)
      acc, total, count = self.program(g)(params, acc, total, count, batch,
                                          jax.random.fold_in(rng, k))
    return total, count, acc

  def train_step(self, state: TrainState, micro_batches) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    total, count, acc = self.gradients(state.params, rng, micro_batches)
    return self._update(state, total, count, acc)
