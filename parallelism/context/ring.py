"""Ring attention: K/V blocks travel around the context axis while queries stay put.

Liu, Zaharia & Abbeel, "Ring Attention with Blockwise Transformers for Near-Infinite
Context", 2023. Device i starts with its own K/V and passes them to i+1 each step; after N
steps its queries have met every block. Partial results merge by log-sum-exp in float32;
fully masked blocks are skipped inside the per-block kernel (`modeling/kernels/`, chosen by
`attention.impl`). The causal load balance comes from the zigzag data layout (`layout.py`):
masks are by positions, so this code does not need to know the layout.

Double buffered, so a step costs max(compute, transfer) on a backend with asynchronous
collectives (GPU, TPU): each step first issues the ppermute that brings the *next* K/V block,
then computes on the current one, which the send does not depend on. The loop runs steps
0..N-2 with that shape and the last step is peeled (it sends nothing), so no collective sits
inside a `cond`/`switch`, where XLA could not schedule it around the compute.
`tests/test_overlap.py` checks both properties on the compiled program.

The custom VJP recomputes every block in the backward pass. K/V are sent ahead the same way;
the dK/dV accumulated for the current block are sent after its compute (they depend on it),
and overlap the next step's compute, which does not need them. After N hops dK/dV arrive at
their owner: per-device memory stays O(L/N). Only the K/V heads travel (GQA: H/K times fewer
bytes than queries would be).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from modeling import blockwise
from modeling.masking import MASK_VALUE
from modeling.kernels import BlockKernel
from parallelism.context.sharded import ContextAxis, merge


@dataclasses.dataclass(frozen=True)
class Static:
  axis: ContextAxis
  causal: bool
  window: int
  kernel: BlockKernel


def _fwd_kernel(st: Static, q, qseg, qpos, kv):
  return st.kernel.forward(q, kv[0], kv[1], qseg, kv[2], qpos, kv[3], causal=st.causal,
                           window=st.window)


def _forward(q, k, v, qseg, kseg, qpos, kpos, st: Static):
  n = st.axis.size

  def step(carry, hop):
    """Compute on the held block; its own send was issued by the caller."""
    o, lse, kv = carry
    return (*merge(o, lse, *_fwd_kernel(st, q, qseg, qpos, st.axis.visible(kv, hop))), kv)

  def step_and_send(hop, carry):
    kv_next = st.axis.shift(carry[2], +1)  # issued first: depends only on the held block
    o, lse, _ = step(carry, hop)
    return o, lse, kv_next

  o0 = jnp.zeros(q.shape, jnp.float32)
  lse0 = jnp.full(q.shape[:3], MASK_VALUE, jnp.float32)
  carry = (o0, lse0, (k, v, kseg, kpos))
  if n > 1:
    carry = jax.lax.fori_loop(0, n - 1, step_and_send, carry)
  o, lse, _ = step(carry, n - 1)  # step N-1, peeled: nothing left to send
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
  delta = blockwise.output_delta(o, do)
  n = st.axis.size

  def step(dq, kv, dkv, hop):
    """Gradients of the held block; dK/dV leave for the next device after the compute."""
    kv = st.axis.visible(kv, hop)
    dq_s, dk_s, dv_s = st.kernel.backward(q, kv[0], kv[1], qseg, kv[2], qpos, kv[3], lse,
                                          delta, do, causal=st.causal, window=st.window)
    return dq + dq_s, st.axis.shift((dkv[0] + dk_s, dkv[1] + dv_s), +1)

  def step_and_send(hop, carry):
    dq, kv, dkv = carry
    kv_next = st.axis.shift(kv, +1)  # sent ahead, independent of this step's compute
    dq, dkv = step(dq, kv, dkv, hop)
    return dq, kv_next, dkv

  zeros = jnp.zeros(k.shape, jnp.float32)
  carry = (jnp.zeros(q.shape, jnp.float32), (k, v, kseg, kpos), (zeros, zeros))
  if n > 1:
    carry = jax.lax.fori_loop(0, n - 1, step_and_send, carry)
  dq, dkv = step(*carry, n - 1)  # the N-th hop brings dK/dV home; K/V need not travel again
  return (dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype),
          None, None, None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def make_local(block_q: int, block_kv: int, zigzag: bool, kernel: BlockKernel | None = None):
  """The per-device ring. `kernel` is the per-block kernel (default: blockwise); its tiles are
  fitted to a zigzag chunk, so a block never straddles two chunks and skipping stays exact."""
  kernel = kernel or BlockKernel('blockwise', block_q, block_kv)
  kernel = dataclasses.replace(kernel, block_q=block_q, block_kv=block_kv)

  def local(q, k, v, qseg, kseg, qpos, kpos, *, axis: ContextAxis, causal, window):
    chunks = 2 if zigzag and causal else 1
    st = Static(axis, causal, window, kernel.fitted(q.shape[1] // chunks, k.shape[1] // chunks))
    return _ring(q, k, v, qseg, kseg, qpos, kpos, st)

  return local
