"""Sliding-window attention under context parallelism: one hop from the predecessor, no ring.

A causal window of w tokens lets token t see t-w+1 .. t. When w-1 fits in one context chunk,
the keys a chunk's queries need are its own plus the last w-1 of its token-order predecessor
chunk: each device fetches that halo of K/V (one `ppermute` per piece, zigzag-aware,
`halo.py`) and runs the single-device kernel on (local queries) x (halo + local keys).
Bytes per device per window layer: halo x K heads x head dim x 2 (K and V) per piece, the
same at every context size, where a ring sends N-1 whole K/V shards. Masks stay by segment
ids and positions, so packing and the zigzag layout need nothing more; a missing predecessor
(the sequence's first chunk) contributes keys of segment -1, which no query matches.

When the window does not fit (w-1 > the local piece length), the attention is not causal, or
a blockwise kernel's key blocks cannot tile (padded halo + piece), the layer goes to the
configured ring/all-gather, and the choice is logged.
"""

import logging

import jax.numpy as jnp
from jax.sharding import Mesh

from modeling.attention import AttendFn
from parallelism.context import halo
from parallelism.context.sharded import ContextAxis, shard_attend

log = logging.getLogger(__name__)


def padded_halo(window: int, multiple: int) -> int:
  """The halo's w-1 keys padded (locally, with keys no query sees) to a multiple of the
  kernel's key block, so halo + piece stays a whole number of blocks."""
  return -(-(window - 1) // multiple) * multiple


def make_local(kernel: AttendFn, zigzag: bool, multiple: int):

  def local(q, k, v, qseg, kseg, qpos, kpos, *, axis: ContextAxis, causal, window):
    del causal  # routed here only when causal
    n = halo.num_pieces(zigzag)
    qs, ks, vs, qss, kss, qps, kps = (halo.split(x, n) for x in (q, k, v, qseg, kseg, qpos,
                                                                 kpos))
    Lp, h = ks.shape[2], window - 1
    tail = lambda x: x[:, :, Lp - h:]
    (hk, hv, hs, hp), has = halo.from_predecessor(
        axis, zigzag, (tail(ks), tail(vs), tail(kss), tail(kps)))
    hs = jnp.where(has[:, None, None], hs, -1)
    pad = padded_halo(window, multiple) - h
    if pad:   # segment -1: masked for every query
      front = lambda x, value=0: jnp.pad(x, [(0, 0), (0, 0), (pad, 0)] + [(0, 0)] * (x.ndim - 3),
                                         constant_values=value)
      hk, hv, hp, hs = front(hk), front(hv), front(hp), front(hs, -1)
    cat = lambda a, b: jnp.concatenate([a, b], axis=1)
    outs = [kernel(qs[p], cat(hk[p], ks[p]), cat(hv[p], vs[p]), q_segment_ids=qss[p],
                   kv_segment_ids=cat(hs[p], kss[p]), q_positions=qps[p],
                   kv_positions=cat(hp[p], kps[p]), causal=True, window=window)
            for p in range(n)]
    return halo.join(jnp.stack(outs))

  return local


def with_window_halo(fallback: AttendFn, kernel: AttendFn, mesh: Mesh, rules, *,
                     context: int, zigzag: bool, block_kv: int) -> AttendFn:
  """`fallback` (ring, token ring, all-gather) for every layer, except causal window layers
  whose window fits one local piece: those take the one-hop halo path.

  `block_kv` > 0 when the kernel is blockwise (its key blocks must tile halo + piece)."""
  halo_attend = shard_attend(make_local(kernel, zigzag, max(block_kv, 1)), mesh, rules)
  logged = set()

  def attend(q_BLHD, k_BSKD, v_BSKD, *, causal, window=0, **ids):
    if not window:
      return fallback(q_BLHD, k_BSKD, v_BSKD, causal=causal, window=window, **ids)
    piece = k_BSKD.shape[1] // (context * halo.num_pieces(zigzag))
    h = window - 1
    total = padded_halo(window, max(block_kv, 1)) + piece
    tiles = not block_kv or block_kv >= total or total % block_kv == 0
    fits = causal and h <= piece and tiles
    key = (window, piece, fits)
    if key not in logged:
      logged.add(key)
      if fits:
        log.info('window %d attention: one-hop halo of %d tokens per piece of %d (no ring)',
                 window, h, piece)
      else:
        log.warning('window %d attention over local pieces of %d tokens (causal=%s): the '
                    'window does not fit one piece, so it uses the ring/all-gather', window,
                    piece, causal)
    if fits:
      return halo_attend(q_BLHD, k_BSKD, v_BSKD, causal=causal, window=window, **ids)
    return fallback(q_BLHD, k_BSKD, v_BSKD, causal=causal, window=window, **ids)

  return attend
