"""The per-block attention kernel seam: `(q, k, v, ids, mask kind) -> (o, lse)` and its backward.

Context-parallel attention (ring, TokenRing, all-gather in `parallelism/context/`) and the
single-device `AttendFn`s all compute attention of some queries over some keys, masked by
separate query / key segment ids and positions (causal, sliding window), and merge partial
results by their log-sum-exp. `BlockKernel` names the implementation that does that step:

  blockwise  pure JAX online softmax (`modeling/blockwise.py`), any backend: the reference
  pallas     fused Pallas kernel (`pallas_flash.py`): Triton on GPU; on CPU it runs in
             Pallas interpret mode (slow; for tests)
  xla        dense scores per block (`dense.py`): short blocks only

`forward(...) -> (o float32 [B, L, H, D], lse float32 [B, L, H])` over the given keys only;
`backward(..., lse, delta, do) -> (dq, dk, dv)` in float32, with the *final* lse of the whole
softmax and delta = rowsum(dO * O), so a ring can call it step by step. `attend(kernel)` is
the single-device `AttendFn` built from a kernel with a recompute-from-lse custom VJP.
"""

import dataclasses
import functools

import jax

from modeling import blockwise
from modeling.kernels import dense

BLOCK_IMPLS = ('blockwise', 'pallas', 'xla')


@dataclasses.dataclass(frozen=True)
class BlockKernel:
  """A per-block kernel and its tiles. Frozen and hashable: it is a static argument of the
  rings' custom VJPs."""
  impl: str = 'blockwise'
  block_q: int = 512
  block_kv: int = 512
  interpret: bool = False  # pallas only: run the kernel in Pallas interpret mode (CPU)
  # blockwise only: each batch row its own block-skip table (rows run one after another), so
  # rows of unrelated tasks compute only their own live block pairs.
  per_row: bool = False

  def __post_init__(self):
    if self.impl not in BLOCK_IMPLS:
      raise ValueError(f'per-block attention kernel {self.impl!r}; valid: {list(BLOCK_IMPLS)}')

  def fitted(self, q_len: int, kv_len: int) -> 'BlockKernel':
    """The tiles used for q_len x kv_len: the configured blocks, or the lengths when shorter
    (a block never straddles a zigzag chunk when the lengths passed are chunk lengths)."""
    return dataclasses.replace(
        self, block_q=blockwise.fit_block(q_len, self.block_q, 'attention.block_q'),
        block_kv=blockwise.fit_block(kv_len, self.block_kv, 'attention.block_kv'))

  def executed_pairs(self, qseg, kseg, qpos, kpos, *, causal: bool, window: int = 0):
    """Host-side count of the (query block, key block) pairs `forward` computes on these ids
    (the kernel's own skip test, evaluated in numpy): an int per row with `per_row`, else the
    batch-shared table's count times the rows (every row computes a live pair). Only the
    blockwise kernel skips; the others compute every pair."""
    import numpy as np
    B, L = np.shape(qseg)
    S = np.shape(kseg)[1]
    tiles = self.fitted(L, S)
    if self.impl != 'blockwise':
      return np.full(B, (L // tiles.block_q) * (S // tiles.block_kv), np.int64)
    live = blockwise.block_table(qseg, kseg, qpos, kpos, causal=causal, window=window,
                                 block_q=tiles.block_q, block_kv=tiles.block_kv, per_row=True,
                                 xp=np)
    if self.per_row:
      return live.sum(axis=(1, 2)).astype(np.int64)
    return np.full(B, live.any(axis=0).sum(), np.int64)

  def _tiles(self):
    return {'block_q': self.block_q, 'block_kv': self.block_kv}

  def forward(self, q, k, v, qseg, kseg, qpos, kpos, *, causal: bool, window: int = 0):
    if self.impl == 'blockwise':
      return blockwise.flash_forward(q, k, v, qseg, kseg, qpos, kpos, causal=causal,
                                     window=window, per_row=self.per_row, **self._tiles())
    if self.impl == 'pallas':
      from modeling.kernels import pallas_flash
      return pallas_flash.flash_forward(q, k, v, qseg, kseg, qpos, kpos, causal=causal,
                                        window=window, interpret=self.interpret,
                                        **self._pallas_tiles(q, k))
    return dense.flash_forward(q, k, v, qseg, kseg, qpos, kpos, causal=causal, window=window)

  def backward(self, q, k, v, qseg, kseg, qpos, kpos, lse, delta, do, *, causal: bool,
               window: int = 0):
    if self.impl == 'blockwise':
      return blockwise.flash_backward(q, k, v, qseg, kseg, qpos, kpos, lse, delta, do,
                                      causal=causal, window=window, per_row=self.per_row,
                                      **self._tiles())
    if self.impl == 'pallas':
      from modeling.kernels import pallas_flash
      return pallas_flash.flash_backward(q, k, v, qseg, kseg, qpos, kpos, lse, delta, do,
                                         causal=causal, window=window,
                                         interpret=self.interpret, **self._pallas_tiles(q, k))
    return dense.flash_backward(q, k, v, qseg, kseg, qpos, kpos, lse, delta, do, causal=causal,
                                window=window)

  def _pallas_tiles(self, q, k):
    from modeling.kernels import pallas_flash
    capped = dataclasses.replace(self, block_q=min(self.block_q, pallas_flash.MAX_BLOCK),
                                 block_kv=min(self.block_kv, pallas_flash.MAX_BLOCK))
    tiles = capped.fitted(q.shape[1], k.shape[1])._tiles()
    if not self.interpret:
      pallas_flash.check_shapes(q.shape[1], k.shape[1], q.shape[3], **tiles)
    return tiles


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _attend(q, k, v, qseg, kseg, qpos, kpos, kernel: BlockKernel, causal: bool, window: int):
  return kernel.forward(q, k, v, qseg, kseg, qpos, kpos, causal=causal,
                        window=window)[0].astype(q.dtype)


def _attend_fwd(q, k, v, qseg, kseg, qpos, kpos, kernel, causal, window):
  o, lse = kernel.forward(q, k, v, qseg, kseg, qpos, kpos, causal=causal, window=window)
  o = o.astype(q.dtype)
  return o, (q, k, v, qseg, kseg, qpos, kpos, o, lse)


def _attend_bwd(kernel, causal, window, res, do):
  q, k, v, qseg, kseg, qpos, kpos, o, lse = res
  dq, dk, dv = kernel.backward(q, k, v, qseg, kseg, qpos, kpos, lse,
                               blockwise.output_delta(o, do), do, causal=causal, window=window)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def attend(kernel: BlockKernel):
  """The single-device `AttendFn` running `kernel` over all keys at once."""

  def fn(q_BLHD, k_BSKD, v_BSKD, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
         causal, window=0):
    return _attend(q_BLHD, k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids, q_positions,
                   kv_positions, kernel, causal, int(window))

  return fn


def pallas_block_cap() -> int:
  """The largest tile the Pallas kernel uses (larger configured blocks are capped to it)."""
  from modeling.kernels import pallas_flash
  return pallas_flash.MAX_BLOCK


def on_cpu() -> bool:
  return jax.default_backend() == 'cpu'
