"""A ragged all-to-all inside `shard_map`: each device sends a different number of rows to each
other device, and only those rows travel.

`exchange(x, route, ...)` moves rows of every device's `x` [rows, ...] into every device's
output [out_rows, ...] as a `Route` says (per device: where its rows for each destination
start, where rows from each source land, and the replicated table of how many `chunk`-row
chunks each (source, destination) pair carries). Output rows nobody writes are zero.

Two implementations with the same meaning:
  ragged   `jax.lax.ragged_all_to_all` (GPU, TPU): one collective, bytes = the rows sent
  permute  one loop over the transfers, each step a single-pair `ppermute` of a piece of 16,
           4 or 1 chunks (a switch over sizes and pairs), trip count from the table. XLA:CPU has no
           ragged-all-to-all (jax 0.10.2: "UNIMPLEMENTED: HLO opcode `ragged-all-to-all`"),
           and a padded all_to_all would send every pair the largest pair's buffer. Bytes =
           the rows sent, in whole chunks; each piece is one collective (latency-bound).
Both are linear maps with a custom VJP: the transpose of moving rows s -> e is moving the
cotangent rows back e -> s (`Route.reversed`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

IMPLS = ('ragged', 'permute')


def default_impl() -> str:
  """`ragged` where XLA implements ragged-all-to-all (GPU, TPU), else `permute`."""
  return 'ragged' if jax.default_backend() in ('gpu', 'cuda', 'rocm', 'tpu') else 'permute'


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Route:
  """One device's view of a ragged exchange (all int32, offsets in rows, counts in chunks).
  send_off [n]    where this device's rows for destination e start in its input
  recv_off [n]    where rows from source s land in this device's output
  dest_off [n]    where this device's rows land in destination e's output (= e's recv_off[me])
  origin_off [n]  where source s's rows for this device start in s's input (= s's send_off[me])
  counts [n, n]   chunks from source s to destination e (the same table on every device)
  """
  send_off: jax.Array
  recv_off: jax.Array
  dest_off: jax.Array
  origin_off: jax.Array
  counts: jax.Array

  def reversed(self) -> 'Route':
    """The route that moves every row back to where it came from."""
    return Route(self.recv_off, self.send_off, self.origin_off, self.dest_off,
                 jnp.swapaxes(self.counts, -1, -2))


# Chunk sizes of the CPU exchange, in units of `chunk` rows, largest first: a pair's rows go
# as 16-unit pieces, then 4s, then 1s, so c units take c // 16 + (c % 16) // 4 + c % 4
# collectives instead of c (each collective is a rendezvous of every device thread on CPU).
PIECES = (16, 4, 1)


def _pieces(counts_flat):
  """[pairs, len(PIECES)] pieces of each size per pair, and each size's first unit offset."""
  out, offs, rest, at = [], [], counts_flat, jnp.zeros_like(counts_flat)
  for size in PIECES:
    k = rest // size
    out.append(k)
    offs.append(at)
    at = at + k * size
    rest = rest - k * size
  return jnp.stack(out, axis=1), jnp.stack(offs, axis=1)


def _permute(x, route: Route, axis, n: int, out_rows: int, chunk: int):
  me = jax.lax.axis_index(axis)
  y = jnp.zeros((out_rows, *x.shape[1:]), x.dtype)
  pieces, offsets = _pieces(route.counts.reshape(n * n))      # [n n, S]
  flat = pieces.reshape(-1)
  ends = jnp.cumsum(flat)
  S = len(PIECES)

  def by_size(size):
    rows = size * chunk
    # One branch per (source, destination) pair: a collective's pairs are static.
    pairs = [functools.partial(jax.lax.ppermute, axis_name=axis, perm=[(s, e)]) if s != e
             else (lambda piece: piece) for s in range(n) for e in range(n)]

    def move(p, unit, y):
      # Every device slices and calls the collective; only s's piece travels, e keeps it.
      s, e = p // n, p % n
      start = jnp.clip(route.send_off[e] + unit * chunk, 0, max(x.shape[0] - rows, 0))
      got = jax.lax.switch(p, pairs, jax.lax.dynamic_slice_in_dim(x, start, rows))
      at = jnp.clip(route.recv_off[s] + unit * chunk, 0, max(out_rows - rows, 0))
      keep = jax.lax.dynamic_slice_in_dim(y, at, rows)
      return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(me == e, got, keep), at, 0)
    return move

  sizes = [by_size(size) if size * chunk <= min(x.shape[0], out_rows) else
           (lambda p, unit, y: y) for size in PIECES]

  def step(t, y):
    # Transfer t: piece i of size class c of pair p, in (pair, size) order.
    j = jnp.searchsorted(ends, t, side='right')
    p, c = j // S, j % S
    i = t - (ends[j] - flat[j])
    unit = offsets[p, c] + i * jnp.asarray(PIECES, jnp.int32)[c]
    return jax.lax.switch(c, sizes, p, unit, y)

  return jax.lax.fori_loop(0, ends[-1], step, y)


def _ragged(x, route: Route, axis, n: int, out_rows: int, chunk: int):
  me = jax.lax.axis_index(axis)
  out = jnp.zeros((out_rows, *x.shape[1:]), x.dtype)
  return jax.lax.ragged_all_to_all(
      x, out, route.send_off, route.counts[me] * chunk, route.dest_off,
      route.counts[:, me] * chunk, axis_name=axis)


def _move(x, route, axis, n, out_rows, chunk, impl):
  fn = {'ragged': _ragged, 'permute': _permute}[impl]
  return fn(x, route, axis, n, out_rows, chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def exchange(x, route: Route, axis, n: int, out_rows: int, chunk: int, impl: str):
  """Rows of `x` moved as `route` says, into [out_rows, ...] per device (unwritten rows 0)."""
  return _move(x, route, axis, n, out_rows, chunk, impl)


def _exchange_fwd(x, route, axis, n, out_rows, chunk, impl):
  return _move(x, route, axis, n, out_rows, chunk, impl), (route, x.shape[0])


def _exchange_bwd(axis, n, out_rows, chunk, impl, res, dy):
  route, in_rows = res
  dx = _move(dy, route.reversed(), axis, n, in_rows, chunk, impl)
  zero_route = jax.tree.map(lambda a: None, route)
  return dx, zero_route


exchange.defvjp(_exchange_fwd, _exchange_bwd)


@functools.lru_cache(maxsize=None)   # once per mesh: the attend fn and the layer stages ask
def verify(mesh, axes, impl: str, seed: int = 0) -> None:
  """Runs a small random exchange (forward and VJP) with `impl` and with `permute` on this
  mesh's `axes` and raises unless both move every row identically. `ragged` cannot run on CPU,
  so this is how a GPU/TPU run checks it before training with it."""
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  names = (axes,) if isinstance(axes, str) else tuple(axes)
  n = int(np.prod([mesh.shape[a] for a in names]))
  axis = names[0] if len(names) == 1 else names
  r = np.random.RandomState(seed)
  counts = r.randint(0, 4, (n, n)) * (1 - np.eye(n, dtype=np.int64))
  chunk, width = 2, 3
  send = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(counts, 1)[:, :-1]], 1)
  recv = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(counts.T, 1)[:, :-1]], 1)
  rows = max(int(counts.sum(1).max()), 1) * chunk
  out_rows = max(int(counts.sum(0).max()), 1) * chunk
  route = {'send_off': send * chunk, 'recv_off': recv * chunk, 'dest_off': recv.T * chunk,
           'origin_off': send.T * chunk, 'counts': np.broadcast_to(counts, (n, n, n))}
  spec = P(axis)
  sharding = NamedSharding(mesh, spec)
  route = {k: jax.device_put(np.ascontiguousarray(v).astype(np.int32), sharding)
           for k, v in route.items()}
  x = jax.device_put(r.randn(n * rows, width).astype(np.float32), sharding)
  w = jax.device_put(r.randn(n * out_rows, width).astype(np.float32), sharding)

  def run(name):
    def f(x, rt):
      rt = Route(**{k: v[0] for k, v in rt.items()})
      return exchange(x, rt, axis, n, out_rows, chunk, name)
    g = jax.shard_map(f, mesh=mesh, in_specs=(spec, spec), out_specs=spec, check_vma=False)
    y = jax.jit(g)(x, route)
    dx = jax.jit(jax.grad(lambda x: (g(x, route) * w).sum()))(x)
    return np.asarray(y), np.asarray(dx)

  got, want = run(impl), run('permute')
  for a, b, what in zip(got, want, ('rows', 'cotangents')):
    if not np.array_equal(a, b):
      raise ValueError(f'parallelism.dca_exchange={impl!r} moved {what} differently from the '
                       "reference exchange on this backend: set parallelism.dca_exchange="
                       "'permute'")
