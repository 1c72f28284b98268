"""Core-attention disaggregation, the device side: the `AttendFn` that runs a host plan.

Zhuang et al., "Efficiently Training LLMs with Core Attention Disaggregation" (DistCA, 2025,
arXiv 2510.18121), sections 4-5. The plan (`parallelism/disaggregation.py`) is read from
`disaggregation.current_plan()`. Per nano-batch, inside a shard_map over the batch axes:

  1. dispatch  gather the query rows and key/value prefixes of outgoing tasks into fixed-
               capacity buckets [n, C] and exchange them with one all_to_all each;
  2. compute   the configured kernel, masked by the plan's server-side segment ids and
               positions: once on the own rows (moved-away queries masked), once on the
               received tasks batched by source ([n, Cq] queries vs [n, Ck] keys);
  3. return    all_to_all the task outputs back; each owner gathers its tokens' outputs.

Gradients come from autodiff: the transpose of an all_to_all is an all_to_all and the
transpose of a gather is a scatter-add, so K/V gradients of every copy sum at the owner.

Ping-pong (DistCA section 5): the micro-batch's local rows form `dca_nano_batches` nano-
batches with their own plans. All dispatches are issued, then the computes, then the returns:
nano-batch B's exchange has no data dependence on A's compute, so a backend with async
collectives (GPU/TPU) can overlap them. The CPU backend runs collectives synchronously.
"""

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from modeling import axes as ax
from modeling.attention import AttendFn
from parallelism import disaggregation as dca
from parallelism import rules as rules_lib

PLAN_KEYS = ('q_send', 'kv_send', 'q_seg', 'q_pos', 'kv_seg', 'kv_pos', 'ret')


def _axis_names(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _dispatch(axis, n, q_TH, k_TK, v_TK, plan):
  """Stage 1 for one nano-batch: the task rows every source sent here, [n, C, heads, D]."""
  def exchange(x):
    return jax.lax.all_to_all(x, axis, 0, 0, tiled=False) if n > 1 else x
  return (exchange(q_TH[plan['q_send']]), exchange(k_TK[plan['kv_send']]),
          exchange(v_TK[plan['kv_send']]))


def _compute(kernel, q, k, v, received, plan, Ra, L):
  """Stage 2: own rows [Ra, L] as on one device (moved queries masked), and the received
  tasks as a batch of n rows, one per source: a task only sees keys from its own source, so
  the cross terms are all masked and skipping them is exact."""
  n = received[0].shape[0]
  T = Ra * L

  def ids(key, C):
    own, recv = plan[key][:T].reshape(Ra, L), plan[key][T:].reshape(n, C)
    return own, recv

  (qs_own, qs_in), (qp_own, qp_in) = (ids(k_, received[0].shape[1]) for k_ in ('q_seg', 'q_pos'))
  (ks_own, ks_in), (kp_own, kp_in) = (ids(k_, received[1].shape[1]) for k_ in ('kv_seg', 'kv_pos'))
  o_own = kernel(q, k, v, q_segment_ids=qs_own, kv_segment_ids=ks_own, q_positions=qp_own,
                 kv_positions=kp_own, causal=True)
  o_in = kernel(*received, q_segment_ids=qs_in, kv_segment_ids=ks_in, q_positions=qp_in,
                kv_positions=kp_in, causal=True)
  return o_own, o_in


def make_local(kernel: AttendFn, n: int, axis):
  """The per-device body: q/k/v [R, L, ., D] plus this device's plan [A, ...] -> o [R, L, H, D]."""

  def local(q, k, v, plan, *, causal, window):
    if not causal or window:
      raise ValueError("parallelism.context_impl='disaggregated' supports causal attention "
                       'without a sliding window (model.sliding_window; model.sambay.window for '
                       "model.name='sambay'): its planner counts causal prefixes")
    R, L, H, D = q.shape
    A = plan['ret'].shape[0]
    Ra = R // A
    nanos = [jax.tree.map(lambda x, a=a: x[a], plan) for a in range(A)]
    rows = [slice(a * Ra, (a + 1) * Ra) for a in range(A)]

    def flat(x):
      return x.reshape(Ra * L, *x.shape[2:])

    # Ping-pong: every exchange first, then every compute, then every return, so nano-batch
    # B's exchange does not wait on A's compute, nor A's return on B's compute.
    received = [_dispatch(axis, n, flat(q[s]), flat(k[s]), flat(v[s]), p)
                for s, p in zip(rows, nanos)]
    outs = [_compute(kernel, q[s], k[s], v[s], r, p, Ra, L)
            for s, r, p in zip(rows, received, nanos)]
    results = []
    for (o_own, o_in), p in zip(outs, nanos):
      back = jax.lax.all_to_all(o_in, axis, 0, 0, tiled=False) if n > 1 else o_in
      o_all = jnp.concatenate([flat(o_own), back.reshape(-1, H, D)])
      results.append(o_all[p['ret']].reshape(Ra, L, H, D))
    return jnp.concatenate(results)

  return local


def make_attend(config: ml_collections.ConfigDict, mesh: Mesh, kernel: AttendFn) -> AttendFn:
  """`parallelism.context_impl='disaggregated'`: attention tasks move over the batch axes."""
  rules = config.parallelism.rules
  q_spec = rules_lib.logical_to_spec((ax.BATCH, ax.LENGTH, ax.ACT_HEADS, None), rules, mesh)
  if rules_lib.mesh_axes_size(mesh, q_spec[1]) != 1:
    raise ValueError("parallelism.context_impl='disaggregated' balances attention over the batch "
                     "axes and does not compose with a context axis: set mesh.context=1 (use "
                     "context_impl='ring' for sequences too long for one device)")
  if config.optimizer.grad_accum_steps != 1:
    raise ValueError("parallelism.context_impl='disaggregated' plans whole batches: set "
                     'optimizer.grad_accum_steps=1')
  names = _axis_names(q_spec[0])
  n = rules_lib.mesh_axes_size(mesh, q_spec[0])
  axis = names[0] if len(names) == 1 else names
  local = make_local(kernel, n, axis)
  plan_spec = P(q_spec[0])

  def attend(q_BLHD, k_BSKD, v_BSKD, *, q_segment_ids, kv_segment_ids, q_positions,
             kv_positions, causal, window=0):
    del q_segment_ids, kv_segment_ids, q_positions, kv_positions  # the plan carries them
    plan = dca.current_plan()
    missing = [k for k in PLAN_KEYS if k not in plan]
    if missing:
      raise ValueError(f'disaggregation plan lacks {missing}')
    plan = {k: plan[k] for k in PLAN_KEYS}
    if plan['ret'].shape[0] != n:
      raise ValueError(f'disaggregation plan is for {plan["ret"].shape[0]} devices, the batch '
                       f'axes have {n}')
    H, K = q_BLHD.shape[2], k_BSKD.shape[2]
    if K % rules_lib.mesh_axes_size(mesh, q_spec[2]):
      k_BSKD, v_BSKD = (jnp.repeat(x, H // K, axis=2) for x in (k_BSKD, v_BSKD))

    def body(q, k, v, p):
      p = jax.tree.map(lambda x: x[0], p)  # this device's [1, A, ...] -> [A, ...]
      return local(q, k, v, p, causal=causal, window=int(window))

    return jax.shard_map(body, mesh=mesh,
                         in_specs=(q_spec, q_spec, q_spec, {k: plan_spec for k in plan}),
                         out_specs=q_spec, check_vma=False)(q_BLHD, k_BSKD, v_BSKD, plan)

  return attend
