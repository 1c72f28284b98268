"""Token-order neighbours of a sequence split over the context axis.

A device's local tokens are one piece (contiguous layout: device d holds chunk d of N) or two
(zigzag, `layout.py`: device d holds chunks d and 2N-1-d of 2N, in that order). Inside a
piece, array order is token order; across pieces it is not. Layers that follow array order
(a causal conv, a scan, a sliding window) need, per piece, something from the piece's
token-order predecessor chunk: its last few inputs (a halo) or its final state. This module
names the pieces and moves the halos, one `ppermute` per piece, never an all-gather.

Who precedes whom: chunk c's predecessor is chunk c-1. Contiguous: device d-1 (device 0 has
none). Zigzag: the front piece (chunk d) comes from device d-1's front piece; the back piece
(chunk 2N-1-d) from device d+1's back piece, except on device N-1, whose back piece (chunk N)
follows its own front piece (chunk N-1): no transfer.
"""

import jax
import jax.numpy as jnp

from parallelism.context.sharded import ContextAxis


def num_pieces(zigzag: bool) -> int:
  return 2 if zigzag else 1


def split(x: jax.Array, k: int) -> jax.Array:
  """[B, k*Lp, ...] -> [k, B, Lp, ...]."""
  B, L = x.shape[:2]
  return jnp.swapaxes(x.reshape(B, k, L // k, *x.shape[2:]), 0, 1)


def join(x: jax.Array) -> jax.Array:
  """[k, B, Lp, ...] -> [B, k*Lp, ...] (the inverse of `split`)."""
  k, B, Lp = x.shape[:3]
  return jnp.swapaxes(x, 0, 1).reshape(B, k * Lp, *x.shape[3:])


def token_order(n: int, zigzag: bool) -> list[tuple[int, int]]:
  """(device, piece) of chunk c = 0, 1, ... in token order."""
  if not zigzag:
    return [(d, 0) for d in range(n)]
  return [(c, 0) if c < n else (2 * n - 1 - c, 1) for c in range(2 * n)]


def chunk_index(axis: ContextAxis, zigzag: bool) -> jax.Array:
  """int32 [k]: the token-order chunk number of each of this device's pieces."""
  me = axis.index()
  if not zigzag:
    return jnp.reshape(me, (1,))
  return jnp.stack([me, 2 * axis.size - 1 - me])


def from_predecessor(axis: ContextAxis, zigzag: bool, tails):
  """Each piece's token-order predecessor's `tails` (a pytree, leading axis = piece), and
  bool [k]: whether that predecessor exists (where not, the received values are zeros)."""
  n, me = axis.size, axis.index()
  take = lambda p: jax.tree.map(lambda t: t[p], tails)
  front = take(0)
  got_front = axis.send(front, [(j, j + 1) for j in range(n - 1)])
  has_front = me > 0
  if not zigzag:
    return jax.tree.map(lambda t: t[None], got_front), jnp.reshape(has_front, (1,))
  got_back = axis.send(take(1), [(j + 1, j) for j in range(n - 1)])
  got_back = jax.tree.map(lambda own, got: jnp.where(me == n - 1, own, got), front, got_back)
  got = jax.tree.map(lambda a, b: jnp.stack([a, b]), got_front, got_back)
  return got, jnp.stack([has_front, jnp.bool_(True)])
