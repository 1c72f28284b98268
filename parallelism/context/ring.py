"""Ring attention: K/V blocks travel around the context axis while queries stay put.

Liu, Zaharia & Abbeel, "Ring Attention with Blockwise Transformers for Near-Infinite
Context", 2023. Device i starts with its own K/V and passes them to i+1 each step; after N
steps its queries have met every block. Partial results merge by log-sum-exp in float32;
fully masked blocks are skipped inside the per-block kernel (`modeling/kernels/`, chosen by
`attention.impl`). The causal load balance comes from the zigzag data layout (`layout.py`):
masks are by positions, so this code does not need to know the layout.

Double buffered, so a step costs max(compute, transfer) on a backend with asynchronous
collectives (GPU, TPU): each step first issues the ppermute that brings the *next* K/V block,
then computes on the current one, which the send does not depend on. K, V, segment ids and
positions travel as one packed byte buffer (`ContextAxis.shift_packed`): one
collective-permute per step, since XLA:GPU keeps about one collective in flight. The loop runs steps
0..N-2 with that shape and the last step is peeled (it sends nothing), so no collective sits
inside a `cond`/`switch`, where XLA could not schedule it around the compute.
`tests/test_overlap.py` checks both properties on the compiled program.

The custom VJP (`modeling.kernels.lse_vjp`, shared with TokenRing and the single-device
kernels) recomputes every block in the backward pass. K/V are sent ahead the same way, and the
dK/dV travel one step late: step s sends, in the same packed buffer as the next K/V, the dK/dV
accumulated up to step s-1 (which do not depend on step s's compute); the receiver adds its
step-s gradients for that block when they arrive. So no send waits on its own step's compute;
only the final hop home after the last step does (once per pass). After N hops dK/dV arrive at
their owner: per-device memory stays O(L/N). Only the K/V heads travel (GQA: H/K times fewer
bytes than queries would be).
"""

import dataclasses

import jax
import jax.numpy as jnp

from modeling import blockwise
from modeling.kernels import BlockKernel, lse_vjp
from modeling.masking import MASK_VALUE
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
    kv_next = st.axis.shift_packed(carry[2], +1)  # issued first: depends only on the held block
    o, lse, _ = step(carry, hop)
    return o, lse, kv_next

  o0 = jnp.zeros(q.shape, jnp.float32)
  lse0 = jnp.full(q.shape[:3], MASK_VALUE, jnp.float32)
  carry = (o0, lse0, (k, v, kseg, kpos))
  if n > 1:
    carry = jax.lax.fori_loop(0, n - 1, step_and_send, carry)
  o, lse, _ = step(carry, n - 1)  # step N-1, peeled: nothing left to send
  return o, lse


def _backward(res, do, st: Static):
  q, k, v, qseg, kseg, qpos, kpos, o, lse = res
  delta = blockwise.output_delta(o, do)
  n, axis = st.axis.size, st.axis

  def grads(kv, hop):
    kv = axis.visible(kv, hop)
    return st.kernel.backward(q, kv[0], kv[1], qseg, kv[2], qpos, kv[3], lse, delta, do,
                              causal=st.causal, window=st.window)

  kv = (k, v, kseg, kpos)
  if n == 1:
    return grads(kv, 0)
  # Step 0: the next K/V leave first, then this block's gradients.
  kv_next = axis.shift_packed(kv, +1)
  dq, dk, dv = grads(kv, 0)
  carry = (dq, kv_next, (dk, dv))

  def step_and_send(hop, carry):
    """One packed send (next K/V + the dK/dV accumulated up to the previous step: one-step
    lag), independent of this step's compute; the arriving dK/dV are for the block held now."""
    dq, kv, dkv = carry
    kv_next, dkv_in = axis.shift_packed((kv, dkv), +1)
    dq_s, dk_s, dv_s = grads(kv, hop)
    return dq + dq_s, kv_next, (dkv_in[0] + dk_s, dkv_in[1] + dv_s)

  if n > 2:
    carry = jax.lax.fori_loop(1, n - 1, step_and_send, carry)
  dq, kv, dkv = carry
  dkv_in = axis.shift_packed(dkv, +1)  # step N-1, peeled: no K/V left to send
  dq_s, dk_s, dv_s = grads(kv, n - 1)
  # The block held at step N-1 belongs to the next device: one hop home, the only send that
  # waits on a compute (once per pass, not once per step).
  dk, dv = axis.shift_packed((dkv_in[0] + dk_s, dkv_in[1] + dv_s), +1)
  return dq + dq_s, dk, dv


_ring = lse_vjp(_forward, _backward)


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
