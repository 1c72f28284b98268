"""`attention.impl='xla'`: plain attention that materialises the [L, S] scores.

`xla_attention` is the single-device `AttendFn` (XLA differentiates it: the scores are kept
for the backward pass). `flash_forward` / `flash_backward` are the per-block kernel: the
same attention that also returns the log-sum-exp, and its backward from the saved lse. Both
suit short blocks; the ring steps of a long sequence want `blockwise`."""

import jax
import jax.numpy as jnp

from modeling.masking import MASK_VALUE, attention_mask


def xla_attention(q_BLHD, k_BSKD, v_BSKD, *, q_segment_ids, kv_segment_ids, q_positions,
                  kv_positions, causal, window=0):
  """Plain attention: materialises the [L, S] scores, softmax in float32.

  The G = H/K query heads of a group are folded into the query length ([B, K, G*L, D]),
  which XLA's CPU dots run ~1.5x faster than a separate group axis.
  """
  B, L, H, D = q_BLHD.shape
  S, K = k_BSKD.shape[1:3]
  G = H // K
  q_BKQD = q_BLHD.reshape(B, L, K, G, D).transpose(0, 2, 3, 1, 4).reshape(B, K, G * L, D)
  scores = jnp.einsum('bkqd,bskd->bkqs', q_BKQD, k_BSKD,
                      preferred_element_type=jnp.float32) * (D ** -0.5)
  mask_BLS = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                            causal=causal, window=window)
  scores = jnp.where(mask_BLS[:, None, None], scores.reshape(B, K, G, L, S), MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKD.dtype).reshape(B, K, G * L, S)
  out_BKQD = jnp.einsum('bkqs,bskd->bkqd', probs, v_BSKD)
  return out_BKQD.reshape(B, K, G, L, D).transpose(0, 3, 1, 2, 4).reshape(B, L, H, D)


def _scores(q_BLHD, k_BSKD, mask_BLS):
  B, L, H, D = q_BLHD.shape
  K = k_BSKD.shape[2]
  q = q_BLHD.reshape(B, L, K, H // K, D)
  s = jnp.einsum('blkgd,bskd->bkgls', q, k_BSKD, preferred_element_type=jnp.float32)
  return jnp.where(mask_BLS[:, None, None], s * D ** -0.5, MASK_VALUE)


def _to_blh(x_BKGL):
  B, K, G, L = x_BKGL.shape
  return x_BKGL.transpose(0, 3, 1, 2).reshape(B, L, K * G)


def _to_bkgl(x_BLH, K):
  B, L, H = x_BLH.shape
  return x_BLH.reshape(B, L, K, H // K).transpose(0, 2, 3, 1)


def flash_forward(q_BLHD, k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids, q_positions,
                  kv_positions, *, causal, window=0):
  """(o [B, L, H, D] float32, lse [B, L, H] float32); rows with no key: o 0, lse MASK_VALUE."""
  B, L, H, D = q_BLHD.shape
  mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                        causal=causal, window=window)
  s = _scores(q_BLHD, k_BSKD, mask)
  m = s.max(-1)
  p = jnp.where(mask[:, None, None], jnp.exp(s - m[..., None]), 0.0)
  row_sum = p.sum(-1)
  seen = row_sum > 0
  safe = jnp.where(seen, row_sum, 1.0)
  o = jnp.einsum('bkgls,bskd->blkgd', p.astype(v_BSKD.dtype), v_BSKD,
                 preferred_element_type=jnp.float32)
  o = o / safe.transpose(0, 3, 1, 2)[..., None]
  lse = jnp.where(seen, m + jnp.log(safe), MASK_VALUE)
  return o.reshape(B, L, H, D), _to_blh(lse)


def flash_backward(q_BLHD, k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids, q_positions,
                   kv_positions, lse_BLH, delta_BLH, do_BLHD, *, causal, window=0):
  B, L, H, D = q_BLHD.shape
  K = k_BSKD.shape[2]
  mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                        causal=causal, window=window)
  s = _scores(q_BLHD, k_BSKD, mask)
  p = jnp.where(mask[:, None, None], jnp.exp(s - _to_bkgl(lse_BLH, K)[..., None]), 0.0)
  q = q_BLHD.reshape(B, L, K, H // K, D)
  do = do_BLHD.reshape(B, L, K, H // K, D).astype(q.dtype)
  dv = jnp.einsum('bkgls,blkgd->bskd', p.astype(do.dtype), do, preferred_element_type=jnp.float32)
  dp = jnp.einsum('blkgd,bskd->bkgls', do, v_BSKD, preferred_element_type=jnp.float32)
  ds = p * (dp - _to_bkgl(delta_BLH, K)[..., None]) * D ** -0.5
  dq = jnp.einsum('bkgls,bskd->blkgd', ds.astype(k_BSKD.dtype), k_BSKD,
                  preferred_element_type=jnp.float32)
  dk = jnp.einsum('bkgls,blkgd->bskd', ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
  return dq.reshape(B, L, H, D), dk, dv
