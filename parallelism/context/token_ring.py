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

Bidirectional in time as well as on the wire: during step s the queries for step s+1 travel
one way while the results of step s-1 travel the other, and neither transfer depends on step
s's compute, so a backend with asynchronous collectives (GPU, TPU) runs both under it. The
N steps are unrolled in Python (N is static): every send has a static permutation, so none
sits inside a `switch` (`tests/test_overlap.py` checks this on the compiled program).

Trainable (the public code is forward-only): the backward pass moves (q, dO, lse, delta) the
same way and returns dQ partials directly, one step late as in the forward pass; dK/dV
accumulate where K/V live, so they never move.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from modeling import blockwise
from modeling.kernels import BlockKernel
from parallelism.context.sharded import ContextAxis, halves, masked_lse, merge


@dataclasses.dataclass(frozen=True)
class Static:
  axis: ContextAxis
  causal: bool
  window: int
  kernel: BlockKernel
  zigzag: bool


def _fwd_kernel(st: Static, q, qseg, qpos, kv):
  return st.kernel.forward(q, kv[0], kv[1], qseg, kv[2], qpos, kv[3], causal=st.causal,
                           window=st.window)


def _bwd_kernel(st: Static, t, kv):
  q, qseg, qpos, do, lse, delta = t
  return st.kernel.backward(q, kv[0], kv[1], qseg, kv[2], qpos, kv[3], lse, delta, do,
                            causal=st.causal, window=st.window)


def _select(pred, a, b):
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _split(tree):
  parts = [halves(x) for x in tree]
  return tuple(p[0] for p in parts), tuple(p[1] for p in parts)


def _join(a, b):
  return jnp.concatenate([a, b], axis=1)


# Static permutations of step s (the loops are unrolled, so s is a Python int).

def _home(n, s):  # device j returns the results of step s to the queries' owner j + s
  return [(j, j + s) for j in range(n)]


def _front_home(n, s):  # only devices j < n - s computed a front query half
  return [(j, j + s) for j in range(n - s)]


def _front_next(n, s):  # front halves move one hop back while their owner is still ahead
  return [(j + 1, j) for j in range(n - s)]


class _Travel:
  """What travels toward step s: all queries (plain), or back and front halves (zigzag)."""

  def __init__(self, axis: ContextAxis, zigzag: bool):
    self.axis, self.zigzag = axis, zigzag

  def next(self, trav, s: int):
    """The travelling tree for step s, sent from the one of step s - 1."""
    if not self.zigzag:
      return self.axis.shift(trav, -1)
    trav_f, trav_b = trav
    return self.axis.send(trav_f, _front_next(self.axis.size, s)), self.axis.shift(trav_b, -1)


def _pipeline(n: int, travel: _Travel, first, compute, deliver):
  """Steps 1..n-1. Step s: issue the transfer for step s+1 and the return of step s-1's
  results, then compute step s; neither transfer depends on that compute."""
  trav = travel.next(first, 1)
  pending = None
  for s in range(1, n):
    nxt = travel.next(trav, s + 1) if s < n - 1 else None
    if pending is not None:
      deliver(s - 1, pending)
    pending = compute(s, trav)
    trav = nxt
  deliver(n - 1, pending)


# ---------------------------------------------------------------- forward

def _forward(q, k, v, qseg, kseg, qpos, kpos, st: Static):
  axis, n = st.axis, st.axis.size
  kv = (k, v, kseg, kpos)
  o, lse = _fwd_kernel(st, q, qseg, qpos, kv)
  if n == 1:
    return o, lse
  travel = _Travel(axis, st.zigzag)
  if not st.zigzag:
    acc = [o, lse]

    def deliver(s, part):
      acc[:] = merge(*acc, *axis.send(part, _home(n, s)))  # results straight home

    _pipeline(n, travel, (q, qseg, qpos), lambda s, trav: _fwd_kernel(st, *trav, kv), deliver)
    return tuple(acc)

  me = axis.index()
  kv_f, kv_b = _split(kv)
  (o_f, o_b), (lse_f, lse_b) = halves(o), halves(lse)
  acc = [o_f, lse_f, o_b, lse_b]

  def compute(s, trav):
    trav_f, trav_b = trav
    ahead = me + s < n  # owner's index is above mine: both query halves, my front K/V
    o1, l1 = _fwd_kernel(st, *trav_b, kv_f)
    o2, l2 = _fwd_kernel(st, *_select(ahead, trav_f, trav_b), _select(ahead, kv_f, kv_b))
    return merge(o1, l1, o2, masked_lse(~ahead, l2)), (o2, l2)

  def deliver(s, part):
    back, front = part
    back = axis.send(back, _home(n, s))
    front = axis.send(front, _front_home(n, s))
    o_f, lse_f, o_b, lse_b = acc
    o_b, lse_b = merge(o_b, lse_b, *back)
    o_f, lse_f = merge(o_f, lse_f, front[0], masked_lse(me >= s, front[1]))
    acc[:] = [o_f, lse_f, o_b, lse_b]

  _pipeline(n, travel, _split((q, qseg, qpos)), compute, deliver)
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
  travel = _Travel(axis, st.zigzag)
  if not st.zigzag:
    acc = [dq, dk, dv]

    def compute(s, trav):
      dq_s, dk_s, dv_s = _bwd_kernel(st, trav, kv)
      acc[1], acc[2] = acc[1] + dk_s, acc[2] + dv_s  # dK/dV stay where K/V live
      return dq_s

    def deliver(s, dq_s):  # dQ partials go straight to the queries' owner
      acc[0] = acc[0] + axis.send(dq_s, _home(n, s))

    _pipeline(n, travel, mine, compute, deliver)
    return tuple(acc)

  me = axis.index()
  kv_f, kv_b = _split(kv)
  acc = [*halves(dq), *halves(dk), *halves(dv)]  # dq_f, dq_b, dk_f, dk_b, dv_f, dv_b

  def compute(s, trav):
    trav_f, trav_b = trav
    ahead = me + s < n
    dq1, dk1, dv1 = _bwd_kernel(st, trav_b, kv_f)
    dq2, dk2, dv2 = _bwd_kernel(st, _select(ahead, trav_f, trav_b), _select(ahead, kv_f, kv_b))
    zero = jnp.zeros_like(dk2)
    dq_f, dq_b, dk_f, dk_b, dv_f, dv_b = acc
    acc[:] = [dq_f, dq_b, dk_f + dk1 + jnp.where(ahead, dk2, zero),
              dk_b + jnp.where(ahead, zero, dk2), dv_f + dv1 + jnp.where(ahead, dv2, zero),
              dv_b + jnp.where(ahead, zero, dv2)]
    return dq1 + jnp.where(ahead, jnp.zeros_like(dq2), dq2), dq2

  def deliver(s, part):
    back, front = part
    acc[1] = acc[1] + axis.send(back, _home(n, s))
    acc[0] = acc[0] + axis.send(front, _front_home(n, s))  # zeros where none was computed

  _pipeline(n, travel, _split(mine), compute, deliver)
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


def make_local(block_q: int, block_kv: int, zigzag: bool, kernel: BlockKernel | None = None):
  """The per-device TokenRing with `kernel` per block (default: blockwise)."""
  kernel = kernel or BlockKernel('blockwise', block_q, block_kv)
  kernel = dataclasses.replace(kernel, block_q=block_q, block_kv=block_kv)

  def local(q, k, v, qseg, kseg, qpos, kpos, *, axis: ContextAxis, causal, window):
    halved = zigzag and causal
    chunks = 2 if halved else 1
    st = Static(axis, causal, window,
                kernel.fitted(q.shape[1] // chunks, k.shape[1] // chunks), halved)
    return _token_ring(q, k, v, qseg, kseg, qpos, kpos, st)

  return local
