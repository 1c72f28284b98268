"""Ring attention: K/V blocks travel around the context axis while queries stay put.

Liu, Zaharia & Abbeel, "Ring Attention with Blockwise Transformers for Near-Infinite
Context", 2023. Device i starts with its own K/V and passes them to i+1 each step; after N
steps its queries have met every block. Partial results merge by log-sum-exp in float32;
fully masked blocks are skipped inside the blockwise kernel. The causal load balance comes
from the zigzag data layout (`layout.py`): masks are by positions, so this code does not
need to know the layout.

The custom VJP recomputes every block in the backward pass and sends (K, V, dK, dV) around
the ring together, so after N hops dK/dV arrive at their owner: per-device memory stays
O(L/N). Only the K/V heads travel (GQA: H/K times fewer bytes than queries would be).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from modeling import blockwise
from modeling.attention import MASK_VALUE
from parallelism.context.sharded import ContextAxis, merge


@dataclasses.dataclass(frozen=True)
class Static:
  axis: ContextAxis
  causal: bool
  window: int
  block_q: int
  block_kv: int


def _kernel_kwargs(st: Static):
  return {'causal': st.causal, 'window': st.window, 'block_q': st.block_q,
          'block_kv': st.block_kv}


def _forward(q, k, v, qseg, kseg, qpos, kpos, st: Static):
  kw = _kernel_kwargs(st)

  def step(s, carry):
    o, lse, kv = carry
    # From step 1 on, hold the block of device (i - s) mod N. (A cond, not a peeled step 0,
    # so the kernel is traced once.)
    kv = jax.lax.cond(s > 0, lambda kv: st.axis.shift(kv, +1), lambda kv: kv, kv)
    o_s, lse_s = blockwise.flash_forward(q, kv[0], kv[1], qseg, kv[2], qpos, kv[3], **kw)
    o, lse = merge(o, lse, o_s, lse_s)
    return o, lse, kv

  o0 = jnp.zeros(q.shape, jnp.float32)
  lse0 = jnp.full(q.shape[:3], MASK_VALUE, jnp.float32)
  o, lse, _ = jax.lax.fori_loop(0, st.axis.size, step, (o0, lse0, (k, v, kseg, kpos)))
  return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _ring(q, k, v, qseg, kseg, qpos, kpos, st: Static):
  return _forward(q, k, v, qseg, kseg, qpos, kpos, st)[0].astype(q.dtype)


def _ring_fwd(q, k, v, qseg, kseg, qpos, kpos, st: Static):
  o, lse = _forward(q, k, v, qseg, kseg, qpos, kpos, st)
  o = o.astype(q.dtype)
  return o, (q, k, v, qseg, kseg, qpos, kpos, o, lse)


def _ring_bwd(st: Static, res, do):
  q, k, v, qseg, kseg, qpos, kpos, o, lse = res
  kw = _kernel_kwargs(st)
  delta = blockwise.output_delta(o, do)
  last = st.axis.size - 1

  def step(s, carry):
    dq, kv, dkv = carry
    k_, v_, kseg_, kpos_ = kv
    dq_s, dk_s, dv_s = blockwise.flash_backward(q, k_, v_, qseg, kseg_, qpos, kpos_, lse, delta,
                                                do, **kw)
    dq, dkv = dq + dq_s, (dkv[0] + dk_s, dkv[1] + dv_s)
    # (K, V, dK, dV) move on together; the N-th hop brings dK/dV home and K/V need not travel.
    kv, dkv = jax.lax.cond(s < last, lambda kv, dkv: st.axis.shift((kv, dkv), +1),
                           lambda kv, dkv: (kv, st.axis.shift(dkv, +1)), kv, dkv)
    return dq, kv, dkv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dq, _, dkv = jax.lax.fori_loop(0, st.axis.size, step,
                                 (jnp.zeros(q.shape, jnp.float32), (k, v, kseg, kpos),
                                  (zeros, zeros)))
  return (dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype),
          None, None, None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def make_local(block_q: int, block_kv: int, zigzag: bool):
  """The per-device ring; blocks never straddle a zigzag chunk, so skipping stays exact."""

  def local(q, k, v, qseg, kseg, qpos, kpos, *, axis: ContextAxis, causal, window):
    chunks = 2 if zigzag and causal else 1
    st = Static(axis, causal, window,
                blockwise.fit_block(q.shape[1] // chunks, block_q, 'attention.block_q'),
                blockwise.fit_block(k.shape[1] // chunks, block_kv, 'attention.block_kv'))
    return _ring(q, k, v, qseg, kseg, qpos, kpos, st)

  return local
