"""Memory-efficient (blockwise) attention in pure JAX: O(L x block) memory instead of O(L x S).

FlashAttention (Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with
IO-Awareness", 2022) and Blockwise Parallel Transformer (Liu & Abbeel, 2023): loop over
key/value blocks keeping a running max and sum (the online softmax, float32), and in the
backward pass recompute each block's probabilities from the saved log-sum-exp instead of
storing them.

Masking is by segment ids and positions (see `modeling/masking.py`). A block pair is skipped
(`lax.cond`) when per-block summaries prove every entry is masked (`block_table`): segment
ranges that do not overlap, every query before every key in (segment, position) order
(causal), or every pair further apart than the sliding window. The proof is conservative,
so skipping never changes results. By default it is made for the whole local batch at once
(a block is computed if any row needs it: one batched einsum per block pair); `per_row=True`
runs the rows one after another, each with its own table, so a batch of unrelated rows (the
disaggregated server's tasks, packed rows of different documents) computes only the block
pairs each row needs.

`flash_forward` / `flash_backward` are the `blockwise` implementation of the per-block
kernel seam (`modeling/kernels/`): single-device `attention.impl=blockwise` (through the one
recompute-from-lse custom VJP there) and ring attention, TokenRing and all-gather
(`parallelism/context/`) all call them, merging partial results by their log-sum-exp.
Rows that see no key at all get output 0 and log-sum-exp `MASK_VALUE` (plain softmax would
give a uniform average there; self-attention never has such rows, a token sees itself).
"""

import functools

import jax
import jax.numpy as jnp

from modeling.masking import MASK_VALUE, attention_mask


def fit_block(length: int, block: int, key: str) -> int:
  """The block size used for `length` tokens: `block`, or `length` when shorter."""
  if block <= 0:
    raise ValueError(f'{key}={block} must be positive')
  if block >= length:
    return length
  if length % block:
    raise ValueError(f'{key}={block} does not divide the (local) sequence length {length}')
  return block


def _summaries(segment_ids_BL, positions_BL, block: int, xp=jnp):
  """Per block, each [B, n]: min/max segment, min/max position, and the (segment, position)
  pairs that are smallest and largest in lexicographic order (segment first)."""
  B, L = segment_ids_BL.shape
  seg = xp.asarray(segment_ids_BL, xp.int32).reshape(B, L // block, block)
  pos = xp.asarray(positions_BL, xp.int32).reshape(B, L // block, block)
  s0, s1 = seg.min(-1), seg.max(-1)
  big = xp.iinfo(xp.int32).max
  p_at_s0 = xp.where(seg == s0[..., None], pos, big).min(-1)
  p_at_s1 = xp.where(seg == s1[..., None], pos, -big).max(-1)
  return {'s0': s0, 's1': s1, 'p0': pos.min(-1), 'p1': pos.max(-1), 'p_at_s0': p_at_s0,
          'p_at_s1': p_at_s1}


def block_table(q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, causal: bool,
                window: int, block_q: int, block_kv: int, per_row: bool = False, xp=jnp):
  """Bool [nq, nk]: may any query of block i (in any batch row) see any key of block j.
  `per_row`: [B, nq, nk], each row's own table. `xp=numpy` evaluates it on the host (planners
  count the block pairs the kernel will compute with the same test).

  A pair is dead when the segment ranges do not overlap; when causal, also when every query
  comes before every key in (segment, position) order (this proves packed rows' blocks dead
  across a document boundary, where positions alone restart); with a window, when every
  query is a window or more past every key (or, not causal, before).
  """
  q = {k: v[:, :, None] for k, v in _summaries(q_segment_ids, q_positions, block_q, xp).items()}
  k = {k: v[:, None, :] for k, v in _summaries(kv_segment_ids, kv_positions, block_kv,
                                               xp).items()}
  live = (q['s0'] <= k['s1']) & (k['s0'] <= q['s1'])
  if causal:
    live &= (q['s1'] > k['s0']) | ((q['s1'] == k['s0']) & (q['p_at_s1'] >= k['p_at_s0']))
  if window:
    live &= q['p0'] - k['p1'] < window
    if not causal:
      live &= k['p0'] - q['p1'] < window
  return live if per_row else live.any(axis=0)


def _blocked(x, block: int):
  """[B, L, ...] -> [L/block, B, block, ...] so a loop can index blocks on the first axis."""
  B, L = x.shape[:2]
  return jnp.swapaxes(x.reshape(B, L // block, block, *x.shape[2:]), 0, 1)


def _unblocked(x):
  n, B, block = x.shape[:3]
  return jnp.swapaxes(x, 0, 1).reshape(B, n * block, *x.shape[3:])


def _scores(q_BQKGD, k_BSKD, mask_BQS, scale):
  s = jnp.einsum('bqkgd,bskd->bkgqs', q_BQKGD, k_BSKD,
                 preferred_element_type=jnp.float32) * scale
  return jnp.where(mask_BQS[:, None, None], s, MASK_VALUE)


def _plan(q_BLHD, k_BSKD, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *,
          causal, window, block_q, block_kv):
  """Shapes, block sizes, softmax scale and the block-skip table shared by both passes."""
  B, L, H, D = q_BLHD.shape
  S, K = k_BSKD.shape[1:3]
  bq = fit_block(L, block_q, 'attention.block_q')
  bk = fit_block(S, block_kv, 'attention.block_kv')
  table = block_table(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal=causal,
                      window=window, block_q=bq, block_kv=bk)
  return B, L, H, D, S, K, H // K, bq, bk, D ** -0.5, table


def flash_forward(q_BLHD, k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids, q_positions,
                  kv_positions, *, causal: bool, window: int = 0, block_q: int = 512,
                  block_kv: int = 512, per_row: bool = False):
  """(o [B, L, H, D] float32, lse [B, L, H] float32) over the given keys only."""
  if per_row and q_BLHD.shape[0] > 1:
    one = functools.partial(flash_forward, causal=causal, window=window, block_q=block_q,
                            block_kv=block_kv)
    o, lse = jax.lax.map(lambda xs: one(*(x[None] for x in xs)),
                         (q_BLHD, k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids, q_positions,
                          kv_positions))
    return o[:, 0], lse[:, 0]
  B, L, H, D, S, K, G, bq, bk, scale, table = _plan(
      q_BLHD, k_BSKD, q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal=causal,
      window=window, block_q=block_q, block_kv=block_kv)
  q_blk = _blocked(q_BLHD.reshape(B, L, K, G, D), bq)
  qseg_blk, qpos_blk = _blocked(q_segment_ids, bq), _blocked(q_positions, bq)
  k_blk, v_blk = _blocked(k_BSKD, bk), _blocked(v_BSKD, bk)
  kseg_blk, kpos_blk = _blocked(kv_segment_ids, bk), _blocked(kv_positions, bk)

  def one_q_block(xs):
    q, qseg, qpos, live_row = xs

    def kv_step(j, carry):
      def compute(carry):
        m, row_sum, acc = carry
        mask = attention_mask(qseg, kseg_blk[j], qpos, kpos_blk[j], causal=causal, window=window)
        s = _scores(q, k_blk[j], mask, scale)
        m_new = jnp.maximum(m, s.max(-1))
        # Masked entries are zeroed explicitly: with a finite mask value, exp(s - m) is 1
        # for them while a row has seen no real key yet.
        p = jnp.where(mask[:, None, None], jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum('bkgqs,bskd->bkgqd', p.astype(v_blk.dtype), v_blk[j],
                        preferred_element_type=jnp.float32)
        return m_new, row_sum * corr + p.sum(-1), acc * corr[..., None] + pv
      return jax.lax.cond(live_row[j], compute, lambda c: c, carry)

    init = (jnp.full((B, K, G, bq), MASK_VALUE, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32),
            jnp.zeros((B, K, G, bq, D), jnp.float32))
    m, row_sum, acc = jax.lax.fori_loop(0, S // bk, kv_step, init)
    seen = row_sum > 0
    safe_sum = jnp.where(seen, row_sum, 1.0)
    o = acc / safe_sum[..., None]
    lse = jnp.where(seen, m + jnp.log(safe_sum), MASK_VALUE)
    # [B, K, G, bq, D] -> [B, bq, H, D]
    return o.transpose(0, 3, 1, 2, 4).reshape(B, bq, H, D), lse.transpose(0, 3, 1, 2).reshape(
        B, bq, H)

  o_blk, lse_blk = jax.lax.map(one_q_block, (q_blk, qseg_blk, qpos_blk, table))
  return _unblocked(o_blk), _unblocked(lse_blk)


def flash_backward(q_BLHD, k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids, q_positions,
                   kv_positions, lse_BLH, delta_BLH, do_BLHD, *, causal: bool, window: int = 0,
                   block_q: int = 512, block_kv: int = 512, per_row: bool = False):
  """(dq, dk, dv) in float32 for these keys, given the final lse and delta = sum(do * o).

  With P = exp(s - lse) the probabilities of the whole softmax (not just these keys):
  dV = P^T dO, dS = P * (dO V^T - delta), dQ = dS K / sqrt(D), dK = dS^T Q / sqrt(D).
  """
  if per_row and q_BLHD.shape[0] > 1:
    one = functools.partial(flash_backward, causal=causal, window=window, block_q=block_q,
                            block_kv=block_kv)
    grads = jax.lax.map(lambda xs: one(*(x[None] for x in xs)),
                        (q_BLHD, k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids, q_positions,
                         kv_positions, lse_BLH, delta_BLH, do_BLHD))
    return tuple(g[:, 0] for g in grads)
  B, L, H, D, S, K, G, bq, bk, scale, table = _plan(
      q_BLHD, k_BSKD, q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal=causal,
      window=window, block_q=block_q, block_kv=block_kv)
  to_bkgq = lambda x: x.reshape(B, -1, K, G).transpose(0, 2, 3, 1)  # [B, bq, H] -> [B,K,G,bq]
  q_blk = _blocked(q_BLHD.reshape(B, L, K, G, D), bq)
  do_blk = _blocked(do_BLHD.reshape(B, L, K, G, D), bq)
  lse_blk, delta_blk = _blocked(lse_BLH, bq), _blocked(delta_BLH, bq)
  qseg_blk, qpos_blk = _blocked(q_segment_ids, bq), _blocked(q_positions, bq)
  k_blk, v_blk = _blocked(k_BSKD, bk), _blocked(v_BSKD, bk)
  kseg_blk, kpos_blk = _blocked(kv_segment_ids, bk), _blocked(kv_positions, bk)

  def one_kv_block(dq_all, xs):
    k, v, kseg, kpos, live_col = xs

    def q_step(i, carry):
      dk, dv, dq_all = carry

      def compute(dk, dv):
        q, do = q_blk[i], do_blk[i]
        mask = attention_mask(qseg_blk[i], kseg, qpos_blk[i], kpos, causal=causal, window=window)
        s = _scores(q, k, mask, scale)
        p = jnp.where(mask[:, None, None], jnp.exp(s - to_bkgq(lse_blk[i])[..., None]), 0.0)
        dv = dv + jnp.einsum('bkgqs,bqkgd->bskd', p.astype(do.dtype), do,
                             preferred_element_type=jnp.float32)
        dp = jnp.einsum('bqkgd,bskd->bkgqs', do, v, preferred_element_type=jnp.float32)
        ds = p * (dp - to_bkgq(delta_blk[i])[..., None]) * scale
        dq = jnp.einsum('bkgqs,bskd->bqkgd', ds.astype(k.dtype), k,
                        preferred_element_type=jnp.float32)
        dk = dk + jnp.einsum('bkgqs,bqkgd->bskd', ds.astype(q.dtype), q,
                             preferred_element_type=jnp.float32)
        return dk, dv, dq

      skip = lambda dk, dv: (dk, dv, jnp.zeros(dq_all.shape[1:], jnp.float32))
      dk, dv, dq = jax.lax.cond(live_col[i], compute, skip, dk, dv)
      # The add stays outside the cond so XLA updates dq_all in place.
      return dk, dv, dq_all.at[i].add(dq)

    zeros = jnp.zeros((B, bk, K, D), jnp.float32)
    dk, dv, dq_all = jax.lax.fori_loop(0, L // bq, q_step, (zeros, zeros, dq_all))
    return dq_all, (dk, dv)

  dq0 = jnp.zeros((L // bq, B, bq, K, G, D), jnp.float32)
  dq_blk, (dk_blk, dv_blk) = jax.lax.scan(one_kv_block, dq0,
                                          (k_blk, v_blk, kseg_blk, kpos_blk, table.T))
  return _unblocked(dq_blk).reshape(B, L, H, D), _unblocked(dk_blk), _unblocked(dv_blk)


def output_delta(o_BLHD, do_BLHD):
  """delta = rowsum(dO * O) in float32, the softmax-backward correction term."""
  return jnp.einsum('blhd,blhd->blh', o_BLHD.astype(jnp.float32), do_BLHD.astype(jnp.float32))
