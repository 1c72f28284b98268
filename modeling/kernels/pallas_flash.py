"""A fused flash-attention kernel in Pallas (Triton lowering on GPU; interpret mode on CPU).

FlashAttention-2 (Dao, 2023) as a per-block kernel for the seam in `modeling/kernels/`: one
program per (query block, batch row, query head) streams the key/value blocks through an
online softmax in float32 and writes o and the log-sum-exp a ring merge needs. Unlike the
kernel shipped in `jax.experimental.pallas.ops.gpu.attention`, masks come from separate
query and key segment ids and positions (packing, any permutation of the sequence such as
the zigzag layout, ring steps whose keys come from another device), with sliding windows,
and grouped-query heads read their shared K/V head through the block index map.

Loop bounds, not branches, skip dead blocks: before the call, the conservative block table
of `modeling/blockwise.py` (segment / position summaries per block) gives every (row, query
block) the range [lo, hi) of key blocks that may hold a live entry, and the kernel loops
over that range only. Causal attention in index order thus stops at the diagonal (as JAX's
kernel does), a sliding window starts at its first live block, and every load in the loop
is unconditional, so Triton can pipeline it (`num_stages`); dead blocks inside the range
(packed rows) are computed and masked. Rows that see no key get o = 0 and lse = MASK_VALUE,
as in `modeling/blockwise.py`.

Outputs are written in `out_dtype` with float32 accumulation: the inputs' dtype where the
caller runs over all keys at once (`attend`), float32 where a ring merges partial results.

Backward: two kernels, as in FlashAttention-2 section 3.2 and JAX's own Triton backward: one
program per (key block, row, kv head) accumulates dK and dV over the live query blocks of its
G query heads, and one per (query block, row, head) accumulates dQ over its live key blocks.
Both recompute P = exp(s - lse) from the final lse the caller passes (the whole softmax's,
so a ring can call them per step) and delta = rowsum(dO * O). That is 7 matmuls per block
pair where a fused kernel needs 5: fusing would accumulate dQ across the key-block programs
with float atomics (non-deterministic sums, so two runs of a step would differ in the last
bits) or hold all of dQ in one program; the recompute is the documented price of exact
reproducibility, as in JAX's kernel.

Tiles: forward and backward are separate (`attention.block_q/block_kv` and
`attention.block_q_bwd/block_kv_bwd`); the backward keeps dK, dV (or dQ) accumulators plus
four score-sized float32 tiles live, so its default is JAX's 32 x 32 (`BWD_BLOCK`). On GPU
Triton needs power-of-two block shapes of at least 16 (head dim too); `check_shapes` says
which config key to change. Tiles are capped at `MAX_BLOCK` with a WARNING naming the key.
Not written (yet): a Mosaic GPU (Hopper wgmma/TMA) variant.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from modeling import blockwise
from modeling.masking import MASK_VALUE

f32 = jnp.float32
MAX_BLOCK = 128
BWD_BLOCK = 32  # default backward tiles (attention.block_q_bwd / block_kv_bwd = 0)
_SQ = getattr(pl, 'squeezed', None)  # a block dimension dropped inside the kernel


def _mask(qseg, qpos, kseg, kpos, causal: bool, window: int):
  """[bq, bk] bool, the rule of `modeling.attention.attention_mask` on 1-D block ids."""
  mask = qseg[:, None] == kseg[None, :]
  delta = qpos[:, None] - kpos[None, :]
  if causal:
    mask = mask & (delta >= 0)
  if window:
    mask = mask & (delta < window)
    if not causal:
      mask = mask & (delta > -window)
  return mask


def _dot_t(a, b):
  """a @ b.T in float32 (contract the last axes)."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=f32)


def _t_dot(a, b):
  """a.T @ b in float32 (contract the first axes)."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=f32)


def _dot(a, b):
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=f32)


def _compiler_params(num_warps: int = 4, num_stages: int = 2):
  """Triton parameters on GPU; the class was renamed across jax versions."""
  from jax.experimental.pallas import triton as plgpu
  cls = getattr(plgpu, 'CompilerParams', None) or plgpu.TritonCompilerParams
  return cls(num_warps=num_warps, num_stages=num_stages)


def _call(kernel, *, grid, in_specs, out_specs, out_shape, interpret, name, num_warps):
  kw = {} if interpret else {'compiler_params': _compiler_params(num_warps)}
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, interpret=interpret, name=name, **kw)


def check_shapes(L: int, S: int, D: int, block_q: int, block_kv: int,
                 keys=('attention.block_q', 'attention.block_kv')):
  """Triton tiles must be powers of two >= 16: a clear error instead of a compiler crash."""
  for value, key in ((block_q, keys[0]), (block_kv, keys[1]), (D, 'model.head_dim')):
    if value < 16 or value & (value - 1):
      raise ValueError(f'{key}={value}: the Pallas attention kernel on GPU needs a power of two '
                       '>= 16 (or set attention.impl to blockwise)')




def _ids(*arrays):
  return tuple(jnp.asarray(a, jnp.int32) for a in arrays)


def _ranges(live):
  """bool [B, n, m] -> int32 [B, n, 2]: per row and block, the range [lo, hi) of the other
  axis's blocks holding every live one ([0, 0) when none is)."""
  m = live.shape[-1]
  some = live.any(-1)
  lo = jnp.argmax(live, axis=-1)
  hi = m - jnp.argmax(live[..., ::-1], axis=-1)
  return jnp.stack([jnp.where(some, lo, 0), jnp.where(some, hi, 0)], -1).astype(jnp.int32)


def _live(qseg, kseg, qpos, kpos, *, causal, window, bq, bk):
  """Per-row block table [B, L/bq, S/bk] (conservative: a dead pair may be marked live)."""
  return blockwise.block_table(qseg, kseg, qpos, kpos, causal=causal, window=window,
                               block_q=bq, block_kv=bk, per_row=True)


def _warps(D: int) -> int:
  return 4 if D <= 64 else 8


# ---------------------------------------------------------------- forward

def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, qpos_ref, kseg_ref, kpos_ref, range_ref, o_ref,
                lse_ref, *, causal, window, scale, block_kv):
  q = q_ref[...]
  qseg, qpos = qseg_ref[...], qpos_ref[...]
  bq, D = q.shape

  def body(j, carry):
    m, row_sum, acc = carry
    sl = pl.ds(j * block_kv, block_kv)
    k, v = k_ref[sl, :], v_ref[sl, :]  # unconditional loads: Triton pipelines them
    mask = _mask(qseg, qpos, kseg_ref[sl], kpos_ref[sl], causal, window)
    s = jnp.where(mask, _dot_t(q, k) * scale, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    # Masked entries are zeroed explicitly: with a finite mask value, exp(s - m) is 1 for
    # them while a row has seen no real key yet.
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    corr = jnp.exp(m - m_new)
    acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v)
    return m_new, row_sum * corr + jnp.sum(p, axis=1), acc

  init = (jnp.full((bq,), MASK_VALUE, f32), jnp.zeros((bq,), f32), jnp.zeros((bq, D), f32))
  m, row_sum, acc = jax.lax.fori_loop(range_ref[0], range_ref[1], body, init)
  seen = row_sum > 0
  safe = jnp.where(seen, row_sum, 1.0)
  o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(safe), MASK_VALUE)


def flash_forward(q_BLHD, k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids, q_positions,
                  kv_positions, *, causal: bool, window: int = 0, block_q: int = 128,
                  block_kv: int = 64, interpret: bool = False, out_dtype=f32):
  """(o [B, L, H, D] out_dtype, lse [B, L, H] float32) over the given keys only."""
  B, L, H, D = q_BLHD.shape
  S, K = k_BSKD.shape[1:3]
  G = H // K
  bq, bk = min(block_q, L), min(block_kv, S)
  window = int(window)
  qseg, qpos, kseg, kpos = _ids(q_segment_ids, q_positions, kv_segment_ids, kv_positions)
  ranges = _ranges(_live(qseg, kseg, qpos, kpos, causal=causal, window=window, bq=bq, bk=bk))
  kernel = functools.partial(_fwd_kernel, causal=causal, window=window, scale=D ** -0.5,
                             block_kv=bk)
  o, lse_BHL = _call(
      kernel, grid=(L // bq, B, H),
      in_specs=[pl.BlockSpec((_SQ, bq, _SQ, D), lambda i, b, h: (b, i, h, 0)),
                pl.BlockSpec((_SQ, S, _SQ, D), lambda i, b, h: (b, 0, h // G, 0)),
                pl.BlockSpec((_SQ, S, _SQ, D), lambda i, b, h: (b, 0, h // G, 0)),
                pl.BlockSpec((_SQ, bq), lambda i, b, h: (b, i)),
                pl.BlockSpec((_SQ, bq), lambda i, b, h: (b, i)),
                pl.BlockSpec((_SQ, S), lambda i, b, h: (b, 0)),
                pl.BlockSpec((_SQ, S), lambda i, b, h: (b, 0)),
                pl.BlockSpec((_SQ, _SQ, 2), lambda i, b, h: (b, i, 0))],
      out_specs=[pl.BlockSpec((_SQ, bq, _SQ, D), lambda i, b, h: (b, i, h, 0)),
                 pl.BlockSpec((_SQ, _SQ, bq), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct((B, L, H, D), out_dtype),
                 jax.ShapeDtypeStruct((B, H, L), f32)],
      interpret=interpret, name='loomax_flash_fwd', num_warps=_warps(D))(
          q_BLHD, k_BSKD, v_BSKD, qseg, qpos, kseg, kpos, ranges)
  return o, lse_BHL.transpose(0, 2, 1)


# ---------------------------------------------------------------- backward

def _dkv_kernel(q_ref, do_ref, lse_ref, delta_ref, qseg_ref, qpos_ref, k_ref, v_ref, kseg_ref,
                kpos_ref, range_ref, dk_ref, dv_ref, *, causal, window, scale, block_q, groups):
  k, v = k_ref[...], v_ref[...]
  kseg, kpos = kseg_ref[...], kpos_ref[...]
  lo, hi = range_ref[0], range_ref[1]
  dk = jnp.zeros(k.shape, f32)
  dv = jnp.zeros(v.shape, f32)
  for g in range(groups):  # the query heads sharing this kv head
    def body(i, carry, g=g):
      dk, dv = carry
      sl = pl.ds(i * block_q, block_q)
      q, do = q_ref[sl, g, :], do_ref[sl, g, :]
      lse, delta = lse_ref[g, sl], delta_ref[g, sl]
      mask = _mask(qseg_ref[sl], qpos_ref[sl], kseg, kpos, causal, window)
      s = _dot_t(q, k) * scale
      p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
      dv = dv + _t_dot(p.astype(do.dtype), do)
      ds = p * (_dot_t(do, v) - delta[:, None]) * scale
      return dk + _t_dot(ds.astype(q.dtype), q), dv

    dk, dv = jax.lax.fori_loop(lo, hi, body, (dk, dv))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, qseg_ref, qpos_ref, k_ref, v_ref, kseg_ref,
               kpos_ref, range_ref, dq_ref, *, causal, window, scale, block_kv):
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  qseg, qpos = qseg_ref[...], qpos_ref[...]

  def body(j, dq):
    sl = pl.ds(j * block_kv, block_kv)
    k, v = k_ref[sl, :], v_ref[sl, :]
    mask = _mask(qseg, qpos, kseg_ref[sl], kpos_ref[sl], causal, window)
    s = _dot_t(q, k) * scale
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    ds = p * (_dot_t(do, v) - delta[:, None]) * scale
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jax.lax.fori_loop(range_ref[0], range_ref[1], body, jnp.zeros(q.shape, f32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def flash_backward(q_BLHD, k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids, q_positions,
                   kv_positions, lse_BLH, delta_BLH, do_BLHD, *, causal: bool, window: int = 0,
                   block_q: int = BWD_BLOCK, block_kv: int = BWD_BLOCK,
                   interpret: bool = False, out_dtype=f32):
  """(dq, dk, dv) in out_dtype for these keys, given the final lse and delta = sum(do * o)."""
  B, L, H, D = q_BLHD.shape
  S, K = k_BSKD.shape[1:3]
  G = H // K
  bq, bk = min(block_q, L), min(block_kv, S)
  scale = D ** -0.5
  window = int(window)
  lse_BHL, delta_BHL = lse_BLH.transpose(0, 2, 1), delta_BLH.transpose(0, 2, 1)
  do_BLHD = do_BLHD.astype(q_BLHD.dtype)
  qseg, qpos, kseg, kpos = _ids(q_segment_ids, q_positions, kv_segment_ids, kv_positions)
  live = _live(qseg, kseg, qpos, kpos, causal=causal, window=window, bq=bq, bk=bk)

  # dK, dV: one program per (key block, row, kv head), over the live queries of its G heads.
  dk, dv = _call(
      functools.partial(_dkv_kernel, causal=causal, window=window, scale=scale, block_q=bq,
                        groups=G),
      grid=(S // bk, B, K),
      in_specs=[pl.BlockSpec((_SQ, L, G, D), lambda j, b, h: (b, 0, h, 0)),
                pl.BlockSpec((_SQ, L, G, D), lambda j, b, h: (b, 0, h, 0)),
                pl.BlockSpec((_SQ, G, L), lambda j, b, h: (b, h, 0)),
                pl.BlockSpec((_SQ, G, L), lambda j, b, h: (b, h, 0)),
                pl.BlockSpec((_SQ, L), lambda j, b, h: (b, 0)),
                pl.BlockSpec((_SQ, L), lambda j, b, h: (b, 0)),
                pl.BlockSpec((_SQ, bk, _SQ, D), lambda j, b, h: (b, j, h, 0)),
                pl.BlockSpec((_SQ, bk, _SQ, D), lambda j, b, h: (b, j, h, 0)),
                pl.BlockSpec((_SQ, bk), lambda j, b, h: (b, j)),
                pl.BlockSpec((_SQ, bk), lambda j, b, h: (b, j)),
                pl.BlockSpec((_SQ, _SQ, 2), lambda j, b, h: (b, j, 0))],
      out_specs=[pl.BlockSpec((_SQ, bk, _SQ, D), lambda j, b, h: (b, j, h, 0)),
                 pl.BlockSpec((_SQ, bk, _SQ, D), lambda j, b, h: (b, j, h, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, S, K, D), out_dtype)] * 2,
      interpret=interpret, name='loomax_flash_dkv', num_warps=_warps(D))(
          q_BLHD, do_BLHD, lse_BHL, delta_BHL, qseg, qpos, k_BSKD, v_BSKD, kseg, kpos,
          _ranges(jnp.swapaxes(live, 1, 2)))

  # dQ: one program per (query block, row, head), over its live key blocks.
  dq = _call(
      functools.partial(_dq_kernel, causal=causal, window=window, scale=scale, block_kv=bk),
      grid=(L // bq, B, H),
      in_specs=[pl.BlockSpec((_SQ, bq, _SQ, D), lambda i, b, h: (b, i, h, 0)),
                pl.BlockSpec((_SQ, bq, _SQ, D), lambda i, b, h: (b, i, h, 0)),
                pl.BlockSpec((_SQ, _SQ, bq), lambda i, b, h: (b, h, i)),
                pl.BlockSpec((_SQ, _SQ, bq), lambda i, b, h: (b, h, i)),
                pl.BlockSpec((_SQ, bq), lambda i, b, h: (b, i)),
                pl.BlockSpec((_SQ, bq), lambda i, b, h: (b, i)),
                pl.BlockSpec((_SQ, S, _SQ, D), lambda i, b, h: (b, 0, h // G, 0)),
                pl.BlockSpec((_SQ, S, _SQ, D), lambda i, b, h: (b, 0, h // G, 0)),
                pl.BlockSpec((_SQ, S), lambda i, b, h: (b, 0)),
                pl.BlockSpec((_SQ, S), lambda i, b, h: (b, 0)),
                pl.BlockSpec((_SQ, _SQ, 2), lambda i, b, h: (b, i, 0))],
      out_specs=pl.BlockSpec((_SQ, bq, _SQ, D), lambda i, b, h: (b, i, h, 0)),
      out_shape=jax.ShapeDtypeStruct((B, L, H, D), out_dtype),
      interpret=interpret, name='loomax_flash_dq', num_warps=_warps(D))(
          q_BLHD, do_BLHD, lse_BHL, delta_BHL, qseg, qpos, k_BSKD, v_BSKD, kseg, kpos,
          _ranges(live))
  return dq, dk, dv
