"""Runs a hybrid-data-parallel plan (`parallelism/hybrid/planner.py`): one compiled program per
layout. The pool's groups, their ring attention and recurrences are `parallelism/hybrid/groups.py`;
the program the loop drives is `training/hybrid/program.py`.

ByteScale (Ge et al., 2025), section 4: every device of the pool (mesh data x fsdp x
context) computes on its own C tokens; a micro-batch's layout, e.g. (4, 2, 1, 1), cuts the
pool into consecutive groups, and each group runs the zigzag ring attention (`context/ring.py`,
reused) among its own members only: the ring's ppermute cycles inside each group (one static
permutation per layout, so JAX compiles once per layout tuple and the executor caches it).
With mixed sizes the ring takes as many steps as the largest group; a K/V block that has gone
round a smaller group once is hidden from its queries (`groups.GroupAxis.visible`: its segment ids
become -1, so the block kernel skips it), and dK/dV still arrive home after the last step
because every size divides the largest (layouts divide the pool, so (1, 2, 4, 8) on 8 devices).
Single devices in a mixed layout thus compute only their own block; idle devices compute
padding, which carries no loss. The whole model runs under one shard_map over the pool (each
device its [1, C] tokens); gradients stay per device while micro-batches of any layout
accumulate, and are summed once per step, then normalised by the global token count, so the
update equals plain data parallelism on the same documents.

`mesh.fsdp > 1` (ZeRO-style): parameters and optimizer state stay sharded over fsdp between
steps (the model's sharding rules); the step gathers the parameters once for all its
micro-batches, and the update reduces the per-device gradients once, into the sharded layout.
`mesh.tensor > 1` is refused (every pool device runs whole layers). `optimizer.grad_accum_steps`
must be 1: the planned micro-batches already accumulate, and `capacity` is the memory knob.

Recurrent layers (SambaY's Mamba: a scan and a causal conv over token order) run inside each
group with the context-parallel scan and conv halo (`context/scan.py`), over a `GroupAxis`
instead of the context mesh axis. That code needs the zigzag context layout (two halves per
device) and one group size per micro-batch, so for such models the plan is made with
`whole_groups=True` (`whole_groups` below): a split document fills its group alone, and
`gradients` refuses buffers laid out otherwise, and `program` refuses mixed layouts.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from modeling import registry
from parallelism.hybrid import planner as hybrid_dp
from parallelism.hybrid.groups import POOL, check_whole_group_layout, layout_of, pool_size
from training import step as step_lib
from training.composition import check_token_order, make_group_runtime
from training.state import ModelSetup, TrainState

def whole_groups(config: ml_collections.ConfigDict) -> bool:
  """Whether plans for this model must give a split document its group alone
  (`hybrid_dp.plan(whole_groups=...)`): yes when it has order-dependent (recurrent) layers."""
  return bool(registry.get_family(config.model.name).order_dependent_layers)


def check_config(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  h = config.parallelism.hybrid_dp
  if mesh.shape['tensor'] != 1:
    raise ValueError('parallelism.hybrid_dp.enabled needs mesh.tensor=1 (every pool device runs '
                     f'whole layers; fsdp may shard the parameters); got mesh.tensor='
                     f'{mesh.shape["tensor"]}')
  if config.optimizer.grad_accum_steps != 1:
    # The plan already accumulates over micro-batches of at most `capacity` tokens per device,
    # which is what bounds activation memory; a second split would only shrink the groups.
    raise ValueError('parallelism.hybrid_dp.enabled accumulates gradients over its own planned '
                     'micro-batches: set optimizer.grad_accum_steps=1 (got '
                     f'{config.optimizer.grad_accum_steps}) and lower '
                     'parallelism.hybrid_dp.capacity to use less memory per micro-batch')
  if config.model.sliding_window:
    raise ValueError('parallelism.hybrid_dp.enabled does not support model.sliding_window')
  check_token_order(config, mesh)   # order-dependent layers without the recurrence seam: g = 1
  hybrid_dp.check_layouts(h.layouts, pool_size(mesh))


class Executor:
  """Compiled per-g gradient programs and the update, for one model on one pool mesh."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, setup: ModelSetup):
    check_config(config, mesh)
    self.config, self.mesh, self.setup = config, mesh, setup
    self.pool = pool_size(mesh)
    self.capacity = int(config.parallelism.hybrid_dp.capacity)
    self.replicated = NamedSharding(mesh, P())
    self.per_device = NamedSharding(mesh, P(POOL))
    self._programs: dict[tuple[int, ...], Any] = {}
    # fsdp > 1: parameters and optimizer state stay sharded between steps (ZeRO); the step
    # gathers the parameters once for all its micro-batches, and the update reduces the
    # per-device gradients once, straight into the sharded layout.
    self._gather = jax.jit(lambda p: p, out_shardings=self.replicated)
    # Only the state is donated: no output has the per-device gradients' shape, so donating
    # them only printed XLA's "unusable donated buffers" warning every step.
    self._update = jax.jit(self._apply, donate_argnums=(0,),
                           out_shardings=(setup.shardings, self.replicated))
    self._zeros = jax.jit(
        lambda params: jax.tree.map(lambda p: jnp.zeros((self.pool, *p.shape), p.dtype), params),
        out_shardings=self.per_device)

  @property
  def program_count(self) -> int:
    """Compiled programs in use: one per distinct layout seen, plus the update."""
    return len(self._programs) + 1

  @property
  def whole_groups(self) -> bool:
    return whole_groups(self.config)

  def _graphdef(self, layout: tuple[int, ...]):
    runtime = make_group_runtime(self.config, layout, self.pool)
    model = nnx.eval_shape(
        lambda: registry.build_model(self.config.model, rngs=nnx.Rngs(0), runtime=runtime))
    return nnx.split(model, nnx.Param, ...)[0]

  def program(self, key):
    """acc, loss, count <- acc + this device's gradient of its micro-batch (no reduction);
    one compiled program per layout (`key`: g for uniform groups of g, or a layout tuple)."""
    layout = layout_of(key, self.pool)
    if len(set(layout)) > 1 and self.whole_groups and max(layout) > 1:
      raise ValueError(
          f'hybrid_dp: layout {layout} mixes group sizes, which this model (recurrent layers '
          'over token order) cannot run: make the plan with whole_groups=True '
          '(hybrid_dp.plan(..., whole_groups=hybrid_exec.whole_groups(config))), which uses '
          'one group size per micro-batch')
    g = layout
    if g not in self._programs:
      graphdef = self._graphdef(layout)
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
    micro-batches; `micro_batches` are (layout key, device buffers) pairs from
    `hybrid_dp.batch_buffers`."""
    acc = self._zeros(params)
    total = jax.device_put(np.zeros(self.pool, np.float32), self.per_device)
    count = jax.device_put(np.zeros(self.pool, np.float32), self.per_device)
    if self.mesh.shape['fsdp'] > 1:
      params = self._gather(params)   # once per step, for every micro-batch
    for key, buffers in micro_batches:
      layout = layout_of(key, self.pool)
      on_host = not isinstance(next(iter(buffers.values())), jax.Array)
      if max(layout) > 1 and self.whole_groups and on_host and len(set(layout)) == 1:
        check_whole_group_layout(layout[0], buffers)
      batch = self.put(buffers) if on_host else buffers
      # The step's key for every micro-batch: stochastic layers draw as on one device.
      acc, total, count = self.program(layout)(params, acc, total, count, batch, rng)
    return total, count, acc

  def train_step(self, state: TrainState, micro_batches) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    total, count, acc = self.gradients(state.params, rng, micro_batches)
    return self._update(state, total, count, acc)
