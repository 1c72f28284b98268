"""TokenRing: queries travel around the context axis; partial outputs travel straight back.

Wang et al., "TokenRing: An Efficient Parallelism Framework for Infinite-Context LLMs via
Bidirectional Communication", 2024 (arXiv 2412.20501). K/V never move. At step s device j
holds the queries of owner (j + s) mod N (queries move one hop to j - 1 per step), computes
their attention over its own K/V, and sends the partial (o, lse) directly to the owner, who
merges it by log-sum-exp. Queries and results flow in opposite directions, so both
directions of a full-duplex link carry traffic (on NVLink/NVSwitch; on a torus the direct
returns are multi-hop).

Causal, zigzag layout (device i holds chunks i and 2N-1-i, index order = position order inside
a segment): if the owner's index is above j, both query halves attend to j's front K/V half
only; otherwise only the owner's back query half attends, to all of j's K/V. Every step
computes two half x half blocks. The front half rides along in the back half's packed buffer
even where it is no longer needed (one collective-permute per step and direction; the devices
past their owner ignore it, and the owner drops a front result by its lse). This relies on the
zigzag layout being in force (`parallelism.zigzag`); without it, or when not causal, whole
query shards travel. The pipeline's padding (segment 0, every token at position 0) breaks the
index-order premise: padding queries then miss padding keys of later chunks, which changes only
padding outputs (no targets, and only padding attends to padding), so losses and gradients stay
exact.

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

import jax
import jax.numpy as jnp

from modeling import blockwise
from modeling.kernels import BlockKernel, lse_vjp
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


class _Travel:
  """What travels toward step s: all queries (plain), or back and front halves (zigzag).

  One packed buffer per step and direction (`ContextAxis.shift_packed`). Zigzag: the front
  halves are only needed by devices j < N - s (their owner is still ahead), but they ride in
  the back halves' buffer to every device: one collective-permute instead of two (XLA:GPU
  keeps about one in flight), and the devices that do not need them never read them
  (`_select(ahead, ...)`)."""

  def __init__(self, axis: ContextAxis, zigzag: bool):
    self.axis, self.zigzag = axis, zigzag

  def next(self, trav, s: int):
    """The travelling tree for step s, sent from the one of step s - 1."""
    del s
    return self.axis.shift_packed(trav, -1)


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
      acc[:] = merge(*acc, *axis.send_packed(part, _home(n, s)))  # results straight home

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
    # Back and front results in one buffer. Only devices j < N - s computed a real front
    # half; the owners of the others (me < s) drop theirs by its lse.
    back, front = axis.send_packed(part, _home(n, s))
    o_f, lse_f, o_b, lse_b = acc
    o_b, lse_b = merge(o_b, lse_b, *back)
    o_f, lse_f = merge(o_f, lse_f, front[0], masked_lse(me >= s, front[1]))
    acc[:] = [o_f, lse_f, o_b, lse_b]

  _pipeline(n, travel, _split((q, qseg, qpos)), compute, deliver)
  o_f, lse_f, o_b, lse_b = acc
  return _join(o_f, o_b), _join(lse_f, lse_b)


# ---------------------------------------------------------------- backward

def _backward(res, do, st: Static):
  """(dq, dk, dv) float32; the forward pass's schedule run backwards in data, not in time."""
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
      acc[0] = acc[0] + axis.send_packed(dq_s, _home(n, s))

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
    back, front = axis.send_packed(part, _home(n, s))  # one buffer, as in the forward pass
    acc[1] = acc[1] + back
    acc[0] = acc[0] + jnp.where(me >= s, front, jnp.zeros_like(front))  # only real fronts

  _pipeline(n, travel, _split(mine), compute, deliver)
  dq_f, dq_b, dk_f, dk_b, dv_f, dv_b = acc
  return _join(dq_f, dq_b), _join(dk_f, dk_b), _join(dv_f, dv_b)


_token_ring = lse_vjp(_forward, _backward)


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
