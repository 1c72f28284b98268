"""TokenRing: queries travel around the context axis; partial outputs travel straight back.

Wang et al., "TokenRing: An Efficient Parallelism Framework for Infinite-Context LLMs via
Bidirectional Communication", 2024 (arXiv 2412.20501). K/V never move. At step s device j
holds the queries of owner (j + s) mod N (queries move one hop to j - 1 per step), computes
their attention over its own K/V, and sends the partial (o, lse) directly to the owner, who
merges it by log-sum-exp. Queries and results flow in opposite directions, so both
directions of a full-duplex link carry traffic (on NVLink/NVSwitch; on a torus the direct
returns are multi-hop).

Causal, zigzag layout (device i holds chunks i and 2N-1-i, index order = position order
inside a segment): if the owner's index is above j, both query halves attend to j's front
K/V half only; otherwise only the owner's back query half attends, to all of j's K/V. So the
front query half travels (and its result returns) only while it is still needed, and every
step computes two half x half blocks. This relies on the zigzag layout being in force
(`parallelism.zigzag`); without it, or when not causal, whole query shards travel. The
pipeline's padding (segment 0, every token at position 0) breaks the index-order premise:
padding queries then miss padding keys of later chunks, which changes only padding outputs
(no targets, and only padding attends to padding), so losses and gradients stay exact.

Trainable (the public code is forward-only): the backward pass moves (q, dO, lse, delta) the
same way and returns dQ partials directly; dK/dV accumulate where K/V live, so they never move.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from modeling import blockwise
from parallelism.context.sharded import ContextAxis, halves, masked_lse, merge


@dataclasses.dataclass(frozen=True)
class Static:
  axis: ContextAxis
  causal: bool
  window: int
  block_q: int
  block_kv: int
  zigzag: bool


def _fwd_kernel(st: Static, q, qseg, qpos, kv):
  return blockwise.flash_forward(q, kv[0], kv[1], qseg, kv[2], qpos, kv[3], causal=st.causal,
                                 window=st.window, block_q=st.block_q, block_kv=st.block_kv)


def _bwd_kernel(st: Static, t, kv):
  q, qseg, qpos, do, lse, delta = t
  return blockwise.flash_backward(q, kv[0], kv[1], qseg, kv[2], qpos, kv[3], lse, delta, do,
                                  causal=st.causal, window=st.window, block_q=st.block_q,
                                  block_kv=st.block_kv)


def _select(pred, a, b):
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _split(tree):
  parts = [halves(x) for x in tree]
  return tuple(p[0] for p in parts), tuple(p[1] for p in parts)


def _join(a, b):
  return jnp.concatenate([a, b], axis=1)


# ---------------------------------------------------------------- forward

def _by_step(axis: ContextAxis, s, tree, pairs_at):
  """Sends `tree` along `pairs_at(step)` for the traced step s: perms must be static, so one
  branch per step (only the sends branch; the kernels stay in one loop body)."""
  branches = [functools.partial(axis.send, pairs=pairs_at(t)) for t in range(1, axis.size)]
  return jax.lax.switch(s - 1, branches, tree)


def _home(n):  # step s: device j returns results to the queries' owner j + s
  return lambda s: [(j, j + s) for j in range(n)]


def _front_home(n):  # only devices j < n - s computed a front query half
  return lambda s: [(j, j + s) for j in range(n - s)]


def _front_next(n):  # front halves move one hop back while their owner is still ahead
  return lambda s: [(j + 1, j) for j in range(n - s)]


def _forward(q, k, v, qseg, kseg, qpos, kpos, st: Static):
  axis, n = st.axis, st.axis.size
  kv = (k, v, kseg, kpos)
  o, lse = _fwd_kernel(st, q, qseg, qpos, kv)
  if n == 1:
    return o, lse
  if not st.zigzag:
    def step(s, carry):
      o, lse, trav = carry
      trav = axis.shift(trav, -1)                     # queries of owner (j + s) mod n
      part = _by_step(axis, s, _fwd_kernel(st, *trav, kv), _home(n))  # results straight home
      return (*merge(o, lse, *part), trav)

    o, lse, _ = jax.lax.fori_loop(1, n, step, (o, lse, (q, qseg, qpos)))
    return o, lse

  me = axis.index()
  kv_f, kv_b = _split(kv)

  def zigzag_step(s, carry):
    (o_f, lse_f, o_b, lse_b), (trav_f, trav_b) = carry
    trav_b = axis.shift(trav_b, -1)
    trav_f = _by_step(axis, s, trav_f, _front_next(n))
    ahead = me + s < n  # owner's index is above mine: both query halves, my front K/V
    o1, l1 = _fwd_kernel(st, *trav_b, kv_f)
    o2, l2 = _fwd_kernel(st, *_select(ahead, trav_f, trav_b), _select(ahead, kv_f, kv_b))
    back = _by_step(axis, s, merge(o1, l1, o2, masked_lse(~ahead, l2)), _home(n))
    front = _by_step(axis, s, (o2, l2), _front_home(n))
    o_b, lse_b = merge(o_b, lse_b, *back)
    o_f, lse_f = merge(o_f, lse_f, front[0], masked_lse(me >= s, front[1]))
    return (o_f, lse_f, o_b, lse_b), (trav_f, trav_b)

  (o_f, o_b), (lse_f, lse_b) = halves(o), halves(lse)
  acc, _ = jax.lax.fori_loop(1, n, zigzag_step,
                             ((o_f, lse_f, o_b, lse_b), _split((q, qseg, qpos))))
  o_f, lse_f, o_b, lse_b = acc
  return _join(o_f, o_b), _join(lse_f, lse_b)


# ---------------------------------------------------------------- backward

def _backward(res, do, st: Static):
  q, k, v, qseg, kseg, qpos, kpos, o, lse = res
  axis, n = st.axis, st.axis.size
  kv = (k, v, kseg, kpos)
  delta = blockwise.output_delta(o, do)
  mine = (q, qseg, qpos, do, lse, delta)
  dq, dk, dv = _bwd_kernel(st, mine, kv)
  if n == 1:
    return dq, dk, dv
  if not st.zigzag:
    def step(s, carry):
      dq, dk, dv, trav = carry
      trav = axis.shift(trav, -1)
      dq_s, dk_s, dv_s = _bwd_kernel(st, trav, kv)
      # dK/dV stay where K/V live; dQ partials go straight to the queries' owner.
      return dq + _by_step(axis, s, dq_s, _home(n)), dk + dk_s, dv + dv_s, trav

    dq, dk, dv, _ = jax.lax.fori_loop(1, n, step, (dq, dk, dv, mine))
    return dq, dk, dv

  me = axis.index()
  kv_f, kv_b = _split(kv)

  def zigzag_step(s, carry):
    (dq_f, dq_b, dk_f, dk_b, dv_f, dv_b), (trav_f, trav_b) = carry
    trav_b = axis.shift(trav_b, -1)
    trav_f = _by_step(axis, s, trav_f, _front_next(n))
    ahead = me + s < n
    dq1, dk1, dv1 = _bwd_kernel(st, trav_b, kv_f)
    dq2, dk2, dv2 = _bwd_kernel(st, _select(ahead, trav_f, trav_b), _select(ahead, kv_f, kv_b))
    zero = jnp.zeros_like(dk2)
    dk_f = dk_f + dk1 + jnp.where(ahead, dk2, zero)
    dv_f = dv_f + dv1 + jnp.where(ahead, dv2, zero)
    dk_b = dk_b + jnp.where(ahead, zero, dk2)
    dv_b = dv_b + jnp.where(ahead, zero, dv2)
    dq_b = dq_b + _by_step(axis, s, dq1 + jnp.where(ahead, jnp.zeros_like(dq2), dq2), _home(n))
    dq_f = dq_f + _by_step(axis, s, dq2, _front_home(n))  # zeros where none was computed
    return (dq_f, dq_b, dk_f, dk_b, dv_f, dv_b), (trav_f, trav_b)

  acc = (*halves(dq), *halves(dk), *halves(dv))
  acc, _ = jax.lax.fori_loop(1, n, zigzag_step, (acc, _split(mine)))
  dq_f, dq_b, dk_f, dk_b, dv_f, dv_b = acc
  return _join(dq_f, dq_b), _join(dk_f, dk_b), _join(dv_f, dv_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _token_ring(q, k, v, qseg, kseg, qpos, kpos, st: Static):
  return _forward(q, k, v, qseg, kseg, qpos, kpos, st)[0].astype(q.dtype)


def _token_ring_fwd(q, k, v, qseg, kseg, qpos, kpos, st: Static):
  o, lse = _forward(q, k, v, qseg, kseg, qpos, kpos, st)
  o = o.astype(q.dtype)
  return o, (q, k, v, qseg, kseg, qpos, kpos, o, lse)


def _token_ring_bwd(st: Static, res, do):
  dq, dk, dv = _backward(res, do, st)
  q, k, v = res[:3]
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_token_ring.defvjp(_token_ring_fwd, _token_ring_bwd)


def make_local(block_q: int, block_kv: int, zigzag: bool):

  def local(q, k, v, qseg, kseg, qpos, kpos, *, axis: ContextAxis, causal, window):
    halved = zigzag and causal
    chunks = 2 if halved else 1
    st = Static(axis, causal, window,
                blockwise.fit_block(q.shape[1] // chunks, block_q, 'attention.block_q'),
                blockwise.fit_block(k.shape[1] // chunks, block_kv, 'attention.block_kv'),
                halved)
    return _token_ring(q, k, v, qseg, kseg, qpos, kpos, st)

  return local
