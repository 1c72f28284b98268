"""Attention kernels: the one registry of `attention.impl` values and the per-block seam.

Every context-parallel strategy and the single-device tiled kernels compute attention of some
queries over some keys, masked by separate query / key segment ids and positions (causal,
sliding window), and merge partial results by their log-sum-exp. `BlockKernel` names the
implementation that does that step:

  blockwise  pure JAX online softmax (`modeling/blockwise.py`), any backend: the reference
  pallas     fused Pallas kernel (`pallas_flash.py`): Triton on GPU; on CPU it runs in
             Pallas interpret mode (slow; for tests)
  xla        dense scores per block (`dense.py`): short blocks only

`forward(...) -> (o [B, L, H, D], lse float32 [B, L, H])` over the given keys only;
`backward(..., lse, delta, do) -> (dq, dk, dv)`, with the *final* lse of the whole softmax
and delta = rowsum(dO * O), so a ring can call it step by step. Both return float32 (what a
ring merges and accumulates) unless `out_dtype` asks for the inputs' dtype (one pass over all
keys: the Pallas kernel then writes it directly, accumulating in float32).

`lse_vjp(forward, backward)` is the one recompute-from-lse custom VJP: `attend(kernel)` (the
single-device `AttendFn` of every tiled kernel, `attention.impl=blockwise|pallas`), ring
and TokenRing (`parallelism/context/`) are all built with it.

`REGISTRY` maps every `attention.impl` to its single-device `AttendFn`, whether it takes the
tiles, the backend it needs and its per-block kernel (if it has one); `KERNELS`, `TPU_KERNELS`,
`TILED` and `BLOCK_IMPLS` are views of it.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from modeling import blockwise
from modeling.kernels import dense, jax_nn, pallas_flash, policy

f32 = jnp.float32


def lse_vjp(forward: Callable, backward: Callable) -> Callable:
  """`f(q, k, v, qseg, kseg, qpos, kpos, static) -> o` (in q's dtype) with a custom VJP that
  keeps (inputs, o, lse) and recomputes the rest.

  forward(q, k, v, qseg, kseg, qpos, kpos, static) -> (o, lse); o may be float32 or q's dtype
  backward(res, do, static) -> (dq, dk, dv); res = (q, k, v, qseg, kseg, qpos, kpos, o, lse)
  `static` is hashable (a dataclass of the kernel, mask and axis).
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
  def f(q, k, v, qseg, kseg, qpos, kpos, static):
    return forward(q, k, v, qseg, kseg, qpos, kpos, static)[0].astype(q.dtype)

  def fwd(q, k, v, qseg, kseg, qpos, kpos, static):
    o, lse = forward(q, k, v, qseg, kseg, qpos, kpos, static)
    o = o.astype(q.dtype)
    return o, (q, k, v, qseg, kseg, qpos, kpos, o, lse)

  def bwd(static, res, do):
    dq, dk, dv = backward(res, do, static)
    q, k, v = res[:3]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None

  f.defvjp(fwd, bwd)
  return f


@dataclasses.dataclass(frozen=True)
class BlockKernel:
  """A per-block kernel and its tiles. Frozen and hashable: it is a static argument of the
  custom VJPs. Backward tiles of 0 mean the kernel's default (blockwise: the forward tiles;
  pallas: `pallas_flash.BWD_BLOCK`)."""
  impl: str = 'blockwise'
  block_q: int = 512
  block_kv: int = 512
  interpret: bool = False  # pallas only: run the kernel in Pallas interpret mode (CPU)
  # blockwise only: each batch row its own block-skip table (rows run one after another), so
  # rows of unrelated tasks compute only their own live block pairs.
  per_row: bool = False
  block_q_bwd: int = 0
  block_kv_bwd: int = 0
  # pallas in interpret mode: still enforce Triton's shape rules (tests at GPU sizes)
  gpu_shapes: bool = False

  def __post_init__(self):
    if self.impl not in BLOCK_IMPLS:
      raise ValueError(f'per-block attention kernel {self.impl!r}; valid: {list(BLOCK_IMPLS)}')

  def fitted(self, q_len: int, kv_len: int) -> 'BlockKernel':
    """The tiles used for q_len x kv_len: the configured blocks, or the lengths when shorter
    (a block never straddles a zigzag chunk when the lengths passed are chunk lengths)."""
    fit = lambda b, n, key: blockwise.fit_block(n, b, key) if b else 0
    return dataclasses.replace(
        self, block_q=fit(self.block_q, q_len, 'attention.block_q'),
        block_kv=fit(self.block_kv, kv_len, 'attention.block_kv'),
        block_q_bwd=fit(self.block_q_bwd, q_len, 'attention.block_q_bwd'),
        block_kv_bwd=fit(self.block_kv_bwd, kv_len, 'attention.block_kv_bwd'))

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

  def forward(self, q, k, v, qseg, kseg, qpos, kpos, *, causal: bool, window: int = 0,
              out_dtype=f32):
    if self.impl == 'blockwise':
      return blockwise.flash_forward(q, k, v, qseg, kseg, qpos, kpos, causal=causal,
                                     window=window, per_row=self.per_row,
                                     block_q=self.block_q, block_kv=self.block_kv)
    if self.impl == 'pallas':
      return pallas_flash.flash_forward(q, k, v, qseg, kseg, qpos, kpos, causal=causal,
                                        window=window, interpret=self.interpret,
                                        out_dtype=out_dtype, **self._pallas_tiles(q, k, False))
    return dense.flash_forward(q, k, v, qseg, kseg, qpos, kpos, causal=causal, window=window)

  def backward(self, q, k, v, qseg, kseg, qpos, kpos, lse, delta, do, *, causal: bool,
               window: int = 0, out_dtype=f32):
    if self.impl == 'blockwise':
      return blockwise.flash_backward(q, k, v, qseg, kseg, qpos, kpos, lse, delta, do,
                                      causal=causal, window=window, per_row=self.per_row,
                                      block_q=self.block_q_bwd or self.block_q,
                                      block_kv=self.block_kv_bwd or self.block_kv)
    if self.impl == 'pallas':
      return pallas_flash.flash_backward(q, k, v, qseg, kseg, qpos, kpos, lse, delta, do,
                                         causal=causal, window=window, interpret=self.interpret,
                                         out_dtype=out_dtype, **self._pallas_tiles(q, k, True))
    return dense.flash_backward(q, k, v, qseg, kseg, qpos, kpos, lse, delta, do, causal=causal,
                                window=window)

  def _pallas_tiles(self, q, k, backward: bool):
    """Tiles for the Pallas kernel: capped at `pallas_flash.MAX_BLOCK` (a WARNING naming the
    key), fitted to the lengths, shape-checked for Triton on GPU."""
    cap = pallas_flash.MAX_BLOCK
    if backward:
      bq = self.block_q_bwd or min(pallas_flash.BWD_BLOCK, self.block_q)
      bk = self.block_kv_bwd or min(pallas_flash.BWD_BLOCK, self.block_kv)
      keys = ('attention.block_q_bwd', 'attention.block_kv_bwd')
    else:
      bq, bk = self.block_q, self.block_kv
      keys = ('attention.block_q', 'attention.block_kv')
    bq = min(policy.cap_tile(bq, cap, keys[0], 'Pallas'), q.shape[1])
    bk = min(policy.cap_tile(bk, cap, keys[1], 'Pallas'), k.shape[1])
    bq = blockwise.fit_block(q.shape[1], bq, keys[0])
    bk = blockwise.fit_block(k.shape[1], bk, keys[1])
    if not self.interpret or self.gpu_shapes:
      pallas_flash.check_shapes(q.shape[1], k.shape[1], q.shape[3], block_q=bq, block_kv=bk,
                                keys=keys)
    return {'block_q': bq, 'block_kv': bk}


@dataclasses.dataclass(frozen=True)
class _Single:
  kernel: BlockKernel
  causal: bool
  window: int


def _single_forward(q, k, v, qseg, kseg, qpos, kpos, st: _Single):
  return st.kernel.forward(q, k, v, qseg, kseg, qpos, kpos, causal=st.causal, window=st.window,
                           out_dtype=q.dtype)


def _single_backward(res, do, st: _Single):
  q, k, v, qseg, kseg, qpos, kpos, o, lse = res
  return st.kernel.backward(q, k, v, qseg, kseg, qpos, kpos, lse, blockwise.output_delta(o, do),
                            do, causal=st.causal, window=st.window, out_dtype=q.dtype)


_attend = lse_vjp(_single_forward, _single_backward)


def attend(kernel: BlockKernel):
  """The single-device `AttendFn` running `kernel` over all keys at once."""

  def fn(q_BLHD, k_BSKD, v_BSKD, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
         causal, window=0):
    return _attend(q_BLHD, k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids, q_positions,
                   kv_positions, _Single(kernel, causal, int(window)))

  return fn


def blockwise_attention(q_BLHD, k_BSKD, v_BSKD, *, block_q: int = 512, block_kv: int = 512,
                        block_q_bwd: int = 0, block_kv_bwd: int = 0, **kwargs):
  """`attention.impl='blockwise'`: exact attention in O(L x block) memory, any backend."""
  kernel = BlockKernel('blockwise', block_q, block_kv, block_q_bwd=block_q_bwd,
                       block_kv_bwd=block_kv_bwd)
  return attend(kernel)(q_BLHD, k_BSKD, v_BSKD, **kwargs)


def pallas_attention(q_BLHD, k_BSKD, v_BSKD, *, block_q: int = 128, block_kv: int = 128,
                     block_q_bwd: int = 0, block_kv_bwd: int = 0, **kwargs):
  """`attention.impl='pallas'`: the fused Pallas flash kernel; interpret mode on CPU."""
  kernel = BlockKernel('pallas', block_q, block_kv, interpret=on_cpu(),
                       block_q_bwd=block_q_bwd, block_kv_bwd=block_kv_bwd)
  return attend(kernel)(q_BLHD, k_BSKD, v_BSKD, **kwargs)


def splash_attention(q_BLHD, k_BSKD, v_BSKD, *, block_q_bwd: int = 0, block_kv_bwd: int = 0,
                     **kwargs):
  """`attention.impl='splash'`: TPU Splash attention, one device in index order (`splash.py`)."""
  del block_q_bwd, block_kv_bwd  # Splash uses its forward tiles for the backward too
  from modeling.kernels import splash  # imported on use: it imports the TPU Pallas modules
  return splash.splash_attention(q_BLHD, k_BSKD, v_BSKD, **kwargs)


@dataclasses.dataclass(frozen=True)
class Impl:
  """One `attention.impl` value."""
  attend: Callable              # its single-device AttendFn
  block: bool = False           # it is also a per-block kernel (`BlockKernel.impl`)
  tiled: bool = False           # attend takes block_q / block_kv (and the backward tiles)
  backend: str | None = None    # runs only on this backend
  index_mask: bool = False      # masks by array index (one device, index order only)


REGISTRY: dict[str, Impl] = {
    'xla': Impl(dense.xla_attention, block=True),
    'jax_nn': Impl(jax_nn.jax_nn_attention, index_mask=True),
    'blockwise': Impl(blockwise_attention, block=True, tiled=True),
    'pallas': Impl(pallas_attention, block=True, tiled=True),
    'splash': Impl(splash_attention, tiled=True, backend='tpu', index_mask=True),
}
# Views of REGISTRY. KERNELS: the ones any backend runs (tests loop over them on CPU).
KERNELS = {name: e.attend for name, e in REGISTRY.items() if e.backend is None}
TPU_KERNELS = {name: e.attend for name, e in REGISTRY.items() if e.backend == 'tpu'}
TILED = tuple(name for name, e in REGISTRY.items() if e.tiled)
BLOCK_IMPLS = tuple(name for name, e in REGISTRY.items() if e.block)


def pallas_block_cap() -> int:
  """The largest tile the Pallas kernel uses (larger configured blocks are capped to it)."""
  return pallas_flash.MAX_BLOCK


def on_cpu() -> bool:
  return jax.default_backend() == 'cpu'
