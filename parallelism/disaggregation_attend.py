"""Core-attention disaggregation, the device side: the `AttendFn` that runs a host plan.

Zhuang et al., "Efficiently Training LLMs with Core Attention Disaggregation" (DistCA, 2025,
arXiv 2510.18121), sections 4-5. The plan (`parallelism/disaggregation.py`) is read from
`disaggregation.current_plan()`. Per nano-batch, inside a shard_map over the batch axes:

  1. dispatch  gather the query rows and key/value prefixes of outgoing tasks into fixed-
               capacity buckets [n, C] and exchange them with one all_to_all each;
  2. compute   one varlen causal attention on [own tokens ; received tasks], masked by the
               plan's server-side segment ids and positions (the configured kernel);
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
  """Stage 1 for one nano-batch: [own tokens ; received task rows] for queries and keys."""
  def exchange(x):
    return jax.lax.all_to_all(x, axis, 0, 0, tiled=False) if n > 1 else x
  q_in = exchange(q_TH[plan['q_send']])                  # [n, Cq, H, D] from each source
  k_in, v_in = exchange(k_TK[plan['kv_send']]), exchange(v_TK[plan['kv_send']])
  q_srv = jnp.concatenate([q_TH, q_in.reshape(-1, *q_TH.shape[1:])])
  k_srv = jnp.concatenate([k_TK, k_in.reshape(-1, *k_TK.shape[1:])])
  v_srv = jnp.concatenate([v_TK, v_in.reshape(-1, *v_TK.shape[1:])])
  return q_srv, k_srv, v_srv


def make_local(kernel: AttendFn, n: int, axis):
  """The per-device body: q/k/v [R, L, ., D] plus this device's plan [A, ...] -> o [R, L, H, D]."""

  def local(q, k, v, plan, *, causal, window):
    if not causal or window:
      raise ValueError("parallelism.context_impl='disaggregated' supports causal attention "
                       'without model.sliding_window (its planner counts causal prefixes)')
    R, L, H, D = q.shape
    A = plan['ret'].shape[0]
    Ra = R // A
    nanos = [jax.tree.map(lambda x, a=a: x[a], plan) for a in range(A)]
    rows = [slice(a * Ra, (a + 1) * Ra) for a in range(A)]
    def flat(x):
      return x.reshape(Ra * L, *x.shape[2:])
    # Ping-pong: every exchange first, then every compute, then every return.
    sent = [_dispatch(axis, n, flat(q[s]), flat(k[s]), flat(v[s]), p)
            for s, p in zip(rows, nanos)]
    outs = []
    for (q_srv, k_srv, v_srv), p in zip(sent, nanos):
      o = kernel(q_srv[None], k_srv[None], v_srv[None], q_segment_ids=p['q_seg'][None],
                 kv_segment_ids=p['kv_seg'][None], q_positions=p['q_pos'][None],
                 kv_positions=p['kv_pos'][None], causal=True)
      outs.append(o[0])
    T = Ra * L
    results = []
    for o, p in zip(outs, nanos):
      back = o[T:].reshape(n, -1, H, D)
      back = jax.lax.all_to_all(back, axis, 0, 0, tiled=False) if n > 1 else back
      o_all = jnp.concatenate([o[:T], back.reshape(-1, H, D)])
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
