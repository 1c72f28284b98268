"""Core-attention disaggregation, the device side: the `AttendFn` that runs a host plan, and
the ping-pong layer schedule.

Zhuang et al., "Efficiently Training LLMs with Core Attention Disaggregation" (DistCA, 2025,
arXiv 2510.18121), sections 4-5. The plan (`parallelism/disaggregation.py`) is a step input:
the attend fn takes it as its `attn_plan` argument (the model passes the batch's plan down to
every attend call). Per nano-batch, inside a shard_map over the batch axes:

  dispatch  gather the query blocks and key/value blocks of outgoing tasks and move them with
            the ragged exchange (`parallelism/ragged.py`): only the planned rows travel;
  compute   the per-block kernel with one skip table per row (`BlockKernel(per_row=True)`):
            the own rows (moved query blocks masked dead) and the received blocks as one row
            whose per-source-row segment ids keep different tasks' pairs dead;
  return    the task outputs travel back by the reversed route; each owner gathers its
            tokens' outputs.

Gradients come from autodiff: the exchange's VJP is the reversed exchange and the transpose
of a gather is a scatter-add, so K/V gradients of every copy sum at the owner.

Ping-pong (DistCA section 5). `Stages` exposes the three steps as separate sharded functions
on global arrays; `PingPong`, installed as the runtime's layer schedule
(`modeling/runtime.py`), runs a layer's stages (`transformer.Block.pre` / `post`) as

  pre(A)  dispatch(A)  pre(B)  dispatch(B)  compute(A)  return(A)  compute(B)  post(A)
  return(B)  post(B)

(pre = norm + QKV + RoPE, post = output projection + residual + MLP), so while one nano-
batch's tasks are in flight the other computes: the order is in the traced program and XLA's
async collectives (GPU/TPU) can overlap it. The CPU backend runs collectives synchronously.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from modeling import axes as ax
from modeling.attention import AttendFn
from modeling import kernels
from modeling.kernels import BlockKernel
from parallelism import ragged
from parallelism import rules as rules_lib

ROUTE_FIELDS = ('send_off', 'recv_off', 'dest_off', 'origin_off', 'counts')
PLAN_KEYS = ('own_qseg', 'q_send', 'kv_send', 'q_seg', 'q_pos', 'kv_seg', 'kv_pos', 'ret',
             *(f'q_{f}' for f in ROUTE_FIELDS), *(f'kv_{f}' for f in ROUTE_FIELDS))


def _axis_names(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _route(plan, prefix) -> ragged.Route:
  return ragged.Route(**{f: plan[prefix + f] for f in ROUTE_FIELDS})


def _check_mask(causal, window):
  if not causal or window:
    raise ValueError("parallelism.context_impl='disaggregated' supports causal attention "
                     'without a sliding window (model.sliding_window; model.sambay.window for '
                     "model.name='sambay'): its planner counts causal prefixes")


@dataclasses.dataclass(frozen=True)
class Local:
  """The per-device steps of one nano-batch (inside a shard_map over the batch axes)."""
  kernel: BlockKernel     # per_row=True
  n: int
  axis: Any
  exchange: str           # ragged.IMPLS

  def _move(self, x, route, rows, chunk):
    return ragged.exchange(x, route, self.axis, self.n, rows, chunk, self.exchange)

  def dispatch(self, q_RLHD, k_RLKD, v_RLKD, plan):
    """The query rows and key/value rows other devices sent here: [Q, H, D], [Kr, 2K, D]."""
    R, L, H, D = q_RLHD.shape
    K = k_RLKD.shape[2]
    q_out = q_RLHD.reshape(R * L, H, D)[plan['q_send']]
    kv_out = jnp.concatenate([k_RLKD, v_RLKD], axis=2).reshape(R * L, 2 * K, D)[plan['kv_send']]
    bq, bk = self.kernel.block_q, self.kernel.block_kv
    return (self._move(q_out, _route(plan, 'q_'), q_out.shape[0], bq),
            self._move(kv_out, _route(plan, 'kv_'), kv_out.shape[0], bk))

  def compute(self, q_RLHD, k_RLKD, v_RLKD, segment_ids, positions, received, plan):
    """(own outputs [R, L, H, D], received tasks' outputs [Q, H, D])."""
    R, L = segment_ids.shape
    # kernels.attend: the kernel with its recompute-from-lse VJP (O(L x block) memory).
    own = kernels.attend(self.kernel.fitted(L, L))
    o_own = own(q_RLHD, k_RLKD, v_RLKD, q_segment_ids=plan['own_qseg'].reshape(R, L),
                kv_segment_ids=segment_ids, q_positions=positions, kv_positions=positions,
                causal=True)
    q_in, kv_in = received
    K = kv_in.shape[1] // 2
    srv = kernels.attend(self.kernel.fitted(q_in.shape[0], kv_in.shape[0]))
    o_in = srv(q_in[None], kv_in[None, :, :K], kv_in[None, :, K:],
               q_segment_ids=plan['q_seg'][None], kv_segment_ids=plan['kv_seg'][None],
               q_positions=plan['q_pos'][None], kv_positions=plan['kv_pos'][None], causal=True)
    return o_own, o_in[0]

  def finish(self, o_own, o_in, plan, dtype):
    """Outputs back to their owners, in token order: [R, L, H, D]."""
    R, L, H, D = o_own.shape
    back = self._move(o_in.astype(dtype), _route(plan, 'q_').reversed(), o_in.shape[0],
                      self.kernel.block_q)
    o_all = jnp.concatenate([o_own.astype(dtype).reshape(R * L, H, D), back])
    return o_all[plan['ret']].reshape(R, L, H, D)


class Setup:
  """Mesh specs and checks shared by the attend fn and the ping-pong stages."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, block: BlockKernel):
    rules = config.parallelism.rules
    self.mesh = mesh
    self.q_spec = rules_lib.logical_to_spec((ax.BATCH, ax.LENGTH, ax.ACT_HEADS, None), rules,
                                            mesh)
    if rules_lib.mesh_axes_size(mesh, self.q_spec[1]) != 1:
      raise ValueError("parallelism.context_impl='disaggregated' balances attention over the "
                       "batch axes and does not compose with a context axis: set "
                       "mesh.context=1 (use context_impl='ring' for sequences too long for one "
                       "device)")
    if config.optimizer.grad_accum_steps != 1:
      raise ValueError("parallelism.context_impl='disaggregated' plans whole batches: set "
                       'optimizer.grad_accum_steps=1')
    if block.impl != 'blockwise':
      raise ValueError("parallelism.context_impl='disaggregated' balances the block pairs the "
                       f"blockwise kernel executes; the per-block kernel here is {block.impl!r}: "
                       "set attention.impl='blockwise'")
    exchange = config.parallelism.dca_exchange
    if exchange == 'auto':
      exchange = ragged.default_impl()
    if exchange not in ragged.IMPLS:
      raise ValueError(f'parallelism.dca_exchange={exchange!r}; valid: auto, '
                       f'{", ".join(ragged.IMPLS)}')
    if exchange == 'ragged':
      ragged.verify(mesh, self.q_spec[0], exchange)   # never run on CPU: check it here first
    names = _axis_names(self.q_spec[0])
    self.n = rules_lib.mesh_axes_size(mesh, self.q_spec[0])
    axis = names[0] if len(names) == 1 else names
    self.heads_spec = self.q_spec[2]
    self.local = Local(dataclasses.replace(block, per_row=True), self.n, axis, exchange)
    self.rows = P(self.q_spec[0])
    self.ids = P(self.q_spec[0], None)

  def plan(self, attn_plan):
    """The batch's plan (the model call's `attn_plan`), checked."""
    if attn_plan is None:
      raise ValueError(
          "parallelism.context_impl='disaggregated' needs the batch's plan ('dca_*' arrays from "
          'parallelism.disaggregation.Planner) passed to the model as `attn_plan` '
          '(training/step.py passes `disaggregation.plan_of(batch)`); compile with the '
          "program's abstract_batch(), which includes the plan's shapes")
    plan = attn_plan
    missing = [k for k in PLAN_KEYS if k not in plan]
    if missing:
      raise ValueError(f'disaggregation plan lacks {missing} (made by an older planner?)')
    plan = {k: plan[k] for k in PLAN_KEYS}
    if plan['ret'].shape[0] != self.n:
      raise ValueError(f'disaggregation plan is for {plan["ret"].shape[0]} devices, the batch '
                       f'axes have {self.n}')
    return plan

  def repeat_kv(self, q, k, v):
    H, K = q.shape[2], k.shape[2]
    if K % rules_lib.mesh_axes_size(self.mesh, self.heads_spec):
      k, v = (jnp.repeat(x, H // K, axis=2) for x in (k, v))
    return k, v

  def shard(self, fn, in_specs, out_specs):
    return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)


def make_attend(config: ml_collections.ConfigDict, mesh: Mesh, block: BlockKernel) -> AttendFn:
  """`parallelism.context_impl='disaggregated'`: attention tasks move over the batch axes.
  Inside the attention op the nano-batches still ping-pong: every dispatch, then every
  compute, then every return (`PingPong` extends this to the whole layer)."""
  setup = Setup(config, mesh, block)
  local = setup.local

  def attend(q_BLHD, k_BSKD, v_BSKD, *, q_segment_ids, kv_segment_ids, q_positions,
             kv_positions, causal, window=0, attn_plan=None):
    _check_mask(causal, window)
    del q_segment_ids, q_positions  # causal self-attention: the key ids are the query ids
    plan = setup.plan(attn_plan)
    k_BSKD, v_BSKD = setup.repeat_kv(q_BLHD, k_BSKD, v_BSKD)

    def body(q, k, v, seg, pos, p):
      p = jax.tree.map(lambda x: x[0], p)  # this device's [1, A, ...] -> [A, ...]
      A = p['ret'].shape[0]
      Ra = q.shape[0] // A
      nanos = [jax.tree.map(lambda x, a=a: x[a], p) for a in range(A)]
      rows = [slice(a * Ra, (a + 1) * Ra) for a in range(A)]
      received = [local.dispatch(q[s], k[s], v[s], pa) for s, pa in zip(rows, nanos)]
      outs = [local.compute(q[s], k[s], v[s], seg[s], pos[s], r, pa)
              for s, r, pa in zip(rows, received, nanos)]
      return jnp.concatenate([local.finish(o_own, o_in, pa, q.dtype)
                              for (o_own, o_in), pa in zip(outs, nanos)])

    q_spec = setup.q_spec
    return setup.shard(body, (q_spec, q_spec, q_spec, setup.ids, setup.ids,
                              {k: setup.rows for k in plan}),
                       q_spec)(q_BLHD, k_BSKD, v_BSKD, kv_segment_ids, kv_positions, plan)

  return attend


@dataclasses.dataclass(frozen=True)
class Stages:
  """The three steps of one nano-batch as sharded functions on global arrays, for the layer-
  wide ping-pong (`PingPong`). Nano-batch a is local rows [a R/A, (a+1) R/A) of every device
  (`split` / `merge`); `plan` is the batch's plan checked by `Setup.plan`."""
  setup: Setup

  def split(self, x, a: int, A: int):
    """Nano-batch a of a global [B, ...] array whose rows are split over the batch devices."""
    n = self.setup.n
    y = x.reshape(n, A, x.shape[0] // (n * A), *x.shape[1:])[:, a]
    return y.reshape(-1, *x.shape[1:])

  def merge(self, parts):
    n = self.setup.n
    y = jnp.stack([p.reshape(n, -1, *p.shape[1:]) for p in parts], axis=1)
    return y.reshape(-1, *parts[0].shape[1:])

  def dispatch(self, q, k, v, plan, a: int):
    s = self.setup
    k, v = s.repeat_kv(q, k, v)
    plan = _nano(plan, a)

    def body(q, k, v, p):
      return s.local.dispatch(q, k, v, jax.tree.map(lambda x: x[0], p))

    return s.shard(body, (s.q_spec, s.q_spec, s.q_spec, {k_: s.rows for k_ in plan}),
                   (s.rows, s.rows))(q, k, v, plan)

  def compute(self, q, k, v, segment_ids, positions, received, plan, a: int):
    s = self.setup
    k, v = s.repeat_kv(q, k, v)
    plan = _nano(plan, a)

    def body(q, k, v, seg, pos, r, p):
      return s.local.compute(q, k, v, seg, pos, r, jax.tree.map(lambda x: x[0], p))

    return s.shard(body, (s.q_spec, s.q_spec, s.q_spec, s.ids, s.ids, (s.rows, s.rows),
                          {k_: s.rows for k_ in plan}),
                   (s.q_spec, s.rows))(q, k, v, segment_ids, positions, received, plan)

  def finish(self, outs, dtype, plan, a: int):
    s = self.setup
    plan = _nano(plan, a)

    def body(o_own, o_in, p):
      return s.local.finish(o_own, o_in, jax.tree.map(lambda x: x[0], p), dtype)

    return s.shard(body, (s.q_spec, s.rows, {k_: s.rows for k_ in plan}), s.q_spec)(
        *outs, plan)


def _nano(plan, a: int):
  return {k: v[:, a] for k, v in plan.items()}


@dataclasses.dataclass(frozen=True)
class PingPong:
  """DistCA's layer schedule (section 5), a `modeling.runtime.LayerSchedule` over nano-batches
  0..A-1: every nano-batch's pre-attention and dispatch, then for each nano-batch its core
  attention, the previous one's post-attention and MLP, and its return, so one nano-batch's
  exchange always has another's compute beside it:
    pre(0) dispatch(0) pre(1) dispatch(1) compute(0) finish(0) compute(1) post(0)
    finish(1) post(1).
  A layer attending with another layer's K/V (`kv` given: routed K/V) runs in the plain
  order, its attention ping-ponging inside the attend fn."""
  stages: Stages

  def __call__(self, layer, x_BLD, *, segment_ids, positions, kv=None, attn_plan=None):
    if kv is not None:
      return layer.forward(x_BLD, segment_ids=segment_ids, positions=positions, kv=kv,
                           attn_plan=attn_plan)
    pp = self.stages
    plan = pp.setup.plan(attn_plan)
    A = plan['ret'].shape[1]
    xs, segs, poss = ([pp.split(t, a, A) for a in range(A)] for t in (x_BLD, segment_ids,
                                                                        positions))
    qkv, sent = [], []
    for a in range(A):
      with jax.named_scope(f'dca_pre_{a}'):
        qkv.append(layer.pre(xs[a], poss[a]))
      with jax.named_scope(f'dca_dispatch_{a}'):
        sent.append(pp.dispatch(*qkv[a], plan, a))
    out = [None] * A
    for a in range(A):
      with jax.named_scope(f'dca_compute_{a}'):
        partial = pp.compute(*qkv[a], segs[a], poss[a], sent[a], plan, a)
      if a:
        with jax.named_scope(f'dca_post_{a - 1}'):
          out[a - 1] = layer.post(xs[a - 1], o_prev)
      with jax.named_scope(f'dca_finish_{a}'):
        o_prev = pp.finish(partial, qkv[a][0].dtype, plan, a)
    with jax.named_scope(f'dca_post_{A - 1}'):
      out[A - 1] = layer.post(xs[A - 1], o_prev)
    kv = (pp.merge([k for _, k, _ in qkv]), pp.merge([v for _, _, v in qkv]))
    return layer.pin(pp.merge(out)), kv


def make_ping_pong(config: ml_collections.ConfigDict, mesh: Mesh, block: BlockKernel) -> PingPong:
  return PingPong(Stages(Setup(config, mesh, block)))
