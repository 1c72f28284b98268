"""A fused flash-attention kernel in Pallas (Triton lowering on GPU; interpret mode on CPU).

FlashAttention-2 (Dao, 2023) as a per-block kernel for the seam in `modeling/kernels/`: one
program per (query block, batch row, query head) streams the key/value blocks through an
online softmax in float32 and writes o and the log-sum-exp a ring merge needs. Unlike the
kernel shipped in `jax.experimental.pallas.ops.gpu.attention`, masks come from separate
query and key segment ids and positions (packing, any permutation of the sequence such as
the zigzag layout, ring steps whose keys come from another device), with sliding windows,
and grouped-query heads read their shared K/V head through the block index map.

A key block whose mask is all false for the query block is skipped (`lax.cond` on the
mask itself, so the skip is exact, not conservative). Rows that see no key get o = 0 and
lse = MASK_VALUE, as in `modeling/blockwise.py`.

Backward: two kernels, as in FlashAttention-2 section 3.2: one program per (key block,
batch row, kv head) accumulates dK and dV over every query block of its G query heads
(no atomics), and one per (query block, row, head) accumulates dQ. Both recompute
P = exp(s - lse) from the final lse the caller passes (the whole softmax's, so a ring
can call them per step) and delta = rowsum(dO * O).

On GPU the Triton compiler needs power-of-two block shapes of at least 16 (head dim too);
`check_shapes` says which config key to change. Tiles are capped at `MAX_BLOCK` (a 128 x 128
float32 score tile already fills a warp group's registers), so the config's blockwise-sized
blocks (512) can stay as they are. Not written (yet): a Mosaic GPU (Hopper wgmma/TMA)
variant; the Triton kernel has not been tuned on a GPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from modeling.attention import MASK_VALUE

f32 = jnp.float32
MAX_BLOCK = 128
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


def _any(mask):
  # One axis per reduction: Triton's lowering reduces a single axis at a time.
  return jnp.max(jnp.max(mask.astype(jnp.int32), axis=1), axis=0) > 0


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


def _call(kernel, *, grid, in_specs, out_specs, out_shape, interpret, name, head_dim):
  kw = {} if interpret else {'compiler_params': _compiler_params(4 if head_dim <= 64 else 8)}
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, interpret=interpret, name=name, **kw)


def check_shapes(L: int, S: int, D: int, block_q: int, block_kv: int):
  """Triton tiles must be powers of two >= 16: a clear error instead of a compiler crash."""
  for value, key in ((block_q, 'attention.block_q'), (block_kv, 'attention.block_kv'),
                     (D, 'model.head_dim')):
    if value < 16 or value & (value - 1):
      raise ValueError(f'{key}={value}: the Pallas attention kernel on GPU needs a power of two '
                       '>= 16 (or set attention.impl to blockwise)')


# ---------------------------------------------------------------- forward

def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, qpos_ref, kseg_ref, kpos_ref, o_ref, lse_ref, *,
                causal, window, scale, block_kv):
  q = q_ref[...]
  qseg, qpos = qseg_ref[...], qpos_ref[...]
  bq, D = q.shape
  n_kv = k_ref.shape[0] // block_kv

  def body(j, carry):
    sl = pl.ds(j * block_kv, block_kv)
    mask = _mask(qseg, qpos, kseg_ref[sl], kpos_ref[sl], causal, window)

    def compute(carry):
      m, row_sum, acc = carry
      s = jnp.where(mask, _dot_t(q, k_ref[sl, :]) * scale, MASK_VALUE)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
      corr = jnp.exp(m - m_new)
      v = v_ref[sl, :]
      acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v)
      return m_new, row_sum * corr + jnp.sum(p, axis=1), acc

    return jax.lax.cond(_any(mask), compute, lambda c: c, carry)

  init = (jnp.full((bq,), MASK_VALUE, f32), jnp.zeros((bq,), f32), jnp.zeros((bq, D), f32))
  m, row_sum, acc = jax.lax.fori_loop(0, n_kv, body, init)
  seen = row_sum > 0
  safe = jnp.where(seen, row_sum, 1.0)
  o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(safe), MASK_VALUE)


def flash_forward(q_BLHD, k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids, q_positions,
                  kv_positions, *, causal: bool, window: int = 0, block_q: int = 128,
                  block_kv: int = 128, interpret: bool = False):
  """(o [B, L, H, D] float32, lse [B, L, H] float32) over the given keys only."""
  B, L, H, D = q_BLHD.shape
  S, K = k_BSKD.shape[1:3]
  G = H // K
  bq, bk = min(block_q, L), min(block_kv, S)
  kernel = functools.partial(_fwd_kernel, causal=causal, window=int(window), scale=D ** -0.5,
                             block_kv=bk)
  o, lse_BHL = _call(
      kernel, grid=(L // bq, B, H),
      in_specs=[pl.BlockSpec((_SQ, bq, _SQ, D), lambda i, b, h: (b, i, h, 0)),
                pl.BlockSpec((_SQ, S, _SQ, D), lambda i, b, h: (b, 0, h // G, 0)),
                pl.BlockSpec((_SQ, S, _SQ, D), lambda i, b, h: (b, 0, h // G, 0)),
                pl.BlockSpec((_SQ, bq), lambda i, b, h: (b, i)),
                pl.BlockSpec((_SQ, bq), lambda i, b, h: (b, i)),
                pl.BlockSpec((_SQ, S), lambda i, b, h: (b, 0)),
                pl.BlockSpec((_SQ, S), lambda i, b, h: (b, 0))],
      out_specs=[pl.BlockSpec((_SQ, bq, _SQ, D), lambda i, b, h: (b, i, h, 0)),
                 pl.BlockSpec((_SQ, _SQ, bq), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct((B, L, H, D), f32), jax.ShapeDtypeStruct((B, H, L), f32)],
      interpret=interpret, name='loomax_flash_fwd', head_dim=D)(
          q_BLHD, k_BSKD, v_BSKD, *_ids(q_segment_ids, q_positions, kv_segment_ids,
                                         kv_positions))
  return o, lse_BHL.transpose(0, 2, 1)


def _ids(*arrays):
  return tuple(jnp.asarray(a, jnp.int32) for a in arrays)


# ---------------------------------------------------------------- backward

def _dkv_kernel(q_ref, do_ref, lse_ref, delta_ref, qseg_ref, qpos_ref, k_ref, v_ref, kseg_ref,
                kpos_ref, dk_ref, dv_ref, *, causal, window, scale, block_q, groups):
  k, v = k_ref[...], v_ref[...]
  kseg, kpos = kseg_ref[...], kpos_ref[...]
  n_q = q_ref.shape[0] // block_q
  dk = jnp.zeros(k.shape, f32)
  dv = jnp.zeros(v.shape, f32)
  for g in range(groups):  # the query heads sharing this kv head
    def body(i, carry, g=g):
      sl = pl.ds(i * block_q, block_q)
      mask = _mask(qseg_ref[sl], qpos_ref[sl], kseg, kpos, causal, window)

      def compute(carry):
        dk, dv = carry
        q, do = q_ref[sl, g, :], do_ref[sl, g, :]
        s = _dot_t(q, k) * scale
        p = jnp.where(mask, jnp.exp(s - lse_ref[g, sl][:, None]), 0.0)
        dv = dv + _t_dot(p.astype(do.dtype), do)
        ds = p * (_dot_t(do, v) - delta_ref[g, sl][:, None]) * scale
        return dk + _t_dot(ds.astype(q.dtype), q), dv

      return jax.lax.cond(_any(mask), compute, lambda c: c, carry)

    dk, dv = jax.lax.fori_loop(0, n_q, body, (dk, dv))
  dk_ref[...] = dk
  dv_ref[...] = dv


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, qseg_ref, qpos_ref, k_ref, v_ref, kseg_ref,
               kpos_ref, dq_ref, *, causal, window, scale, block_kv):
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  qseg, qpos = qseg_ref[...], qpos_ref[...]
  n_kv = k_ref.shape[0] // block_kv

  def body(j, dq):
    sl = pl.ds(j * block_kv, block_kv)
    mask = _mask(qseg, qpos, kseg_ref[sl], kpos_ref[sl], causal, window)

    def compute(dq):
      k = k_ref[sl, :]
      s = _dot_t(q, k) * scale
      p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
      ds = p * (_dot_t(do, v_ref[sl, :]) - delta[:, None]) * scale
      return dq + _dot(ds.astype(k.dtype), k)

    return jax.lax.cond(_any(mask), compute, lambda c: c, dq)

  dq_ref[...] = jax.lax.fori_loop(0, n_kv, body, jnp.zeros(q.shape, f32))


def flash_backward(q_BLHD, k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids, q_positions,
                   kv_positions, lse_BLH, delta_BLH, do_BLHD, *, causal: bool, window: int = 0,
                   block_q: int = 128, block_kv: int = 128, interpret: bool = False):
  """(dq, dk, dv) float32 for these keys, given the final lse and delta = sum(do * o)."""
  B, L, H, D = q_BLHD.shape
  S, K = k_BSKD.shape[1:3]
  G = H // K
  bq, bk = min(block_q, L), min(block_kv, S)
  scale = D ** -0.5
  window = int(window)
  lse_BHL, delta_BHL = lse_BLH.transpose(0, 2, 1), delta_BLH.transpose(0, 2, 1)
  do_BLHD = do_BLHD.astype(q_BLHD.dtype)
  qseg, qpos, kseg, kpos = _ids(q_segment_ids, q_positions, kv_segment_ids, kv_positions)

  # dK, dV: one program per (key block, row, kv head), over all queries of its G heads.
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
                pl.BlockSpec((_SQ, bk), lambda j, b, h: (b, j))],
      out_specs=[pl.BlockSpec((_SQ, bk, _SQ, D), lambda j, b, h: (b, j, h, 0)),
                 pl.BlockSpec((_SQ, bk, _SQ, D), lambda j, b, h: (b, j, h, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, S, K, D), f32)] * 2,
      interpret=interpret, name='loomax_flash_dkv', head_dim=D)(
          q_BLHD, do_BLHD, lse_BHL, delta_BHL, qseg, qpos, k_BSKD, v_BSKD, kseg, kpos)

  # dQ: one program per (query block, row, head), over every key block.
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
                pl.BlockSpec((_SQ, S), lambda i, b, h: (b, 0))],
      out_specs=pl.BlockSpec((_SQ, bq, _SQ, D), lambda i, b, h: (b, i, h, 0)),
      out_shape=jax.ShapeDtypeStruct((B, L, H, D), f32),
      interpret=interpret, name='loomax_flash_dq', head_dim=D)(
          q_BLHD, do_BLHD, lse_BHL, delta_BHL, qseg, qpos, k_BSKD, v_BSKD, kseg, kpos)
  return dq, dk, dv
