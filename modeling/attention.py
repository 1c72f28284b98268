"""The attention seam: every model computes core attention through one `AttendFn`.

Which implementation runs (plain XLA, `jax.nn.dot_product_attention`, blockwise, or a
context-parallel one from `parallelism/context/`) is chosen by config in `training/`
and handed to the model, so one strategy serves every family.

Masking is by segment ids and positions rather than by array index: token i may see
token j when both are in the same segment and, if causal, pos_i >= pos_j (and, with a
sliding window, pos_i - pos_j < window). That stays correct under packing and under any
permutation of the sequence (the zigzag layout of ring attention).
"""

import logging
from typing import Protocol

import jax
import jax.numpy as jnp

log = logging.getLogger('loomax')

# Finite, so fully masked rows give a uniform softmax instead of NaN (see JAX_NOTES).
MASK_VALUE = -1e30


class AttendFn(Protocol):

  def __call__(self, q_BLHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, *,
               q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
               q_positions: jax.Array, kv_positions: jax.Array,
               causal: bool, window: int = 0) -> jax.Array:
    """Softmax(q k^T / sqrt(D) + mask) v with H query heads sharing K key/value heads."""
    ...


def attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, causal: bool,
                   window: int = 0) -> jax.Array:
  """Boolean [B, L, S]: may query i attend to key j."""
  mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  delta = q_positions[:, :, None] - kv_positions[:, None, :]
  if causal:
    mask &= delta >= 0
  if window:
    mask &= delta < window
    if not causal:
      mask &= delta > -window
  return mask


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


def jax_nn_attention(q_BLHD, k_BSKD, v_BSKD, *, q_segment_ids, kv_segment_ids, q_positions,
                     kv_positions, causal, window=0, index_ordered: bool = False):
  """`jax.nn.dot_product_attention`: cuDNN flash attention on GPU where the mask fits, else XLA.

  cuDNN (through jax.nn) knows causal-by-index and local windows, not positions or packed
  segments. With `index_ordered` (the caller promises positions increase with the index
  inside every segment: one device, no zigzag) causal and windows go to cuDNN as `is_causal`
  and `local_window_size`, and segments as a boolean mask (which cuDNN applies as a bias:
  exact, but an [L, S] tensor). Otherwise, and on other backends, jax.nn's XLA path runs with
  the full position mask. Which one ran is logged once per trace.
  """
  mask_BLS = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                            causal=causal, window=window)
  if jax.default_backend() == 'gpu' and index_ordered and causal:
    seg_BLS = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    log.info('attention jax_nn: cuDNN (is_causal, window %d, segment mask as bias)', window)
    return jax.nn.dot_product_attention(
        q_BLHD, k_BSKD, v_BSKD, mask=seg_BLS[:, None], is_causal=True,
        local_window_size=(window - 1, 0) if window else None, implementation='cudnn')
  why = ('not a GPU backend' if jax.default_backend() != 'gpu' else
         'not causal' if not causal else 'positions not in index order (context parallel)')
  log.info('attention jax_nn: XLA implementation (%s)', why)
  return jax.nn.dot_product_attention(q_BLHD, k_BSKD, v_BSKD, mask=mask_BLS[:, None],
                                      implementation='xla')


def self_attention_kwargs(segment_ids_BL, positions_BL) -> dict:
  return dict(q_segment_ids=segment_ids_BL, kv_segment_ids=segment_ids_BL,
              q_positions=positions_BL, kv_positions=positions_BL)


def blockwise_attention(q_BLHD, k_BSKD, v_BSKD, **kwargs):
  """Flash-style attention in O(L x block) memory (`modeling/blockwise.py`)."""
  from modeling import blockwise  # imported here: blockwise builds on this module
  return blockwise.blockwise_attention(q_BLHD, k_BSKD, v_BSKD, **kwargs)


def pallas_attention(q_BLHD, k_BSKD, v_BSKD, *, block_q: int = 128, block_kv: int = 128,
                     **kwargs):
  """The fused Pallas flash kernel (`modeling/kernels/pallas_flash.py`); interpret mode on CPU."""
  from modeling import kernels  # imported here: kernels build on this module
  kernel = kernels.BlockKernel('pallas', block_q, block_kv, interpret=kernels.on_cpu())
  return kernels.attend(kernel)(q_BLHD, k_BSKD, v_BSKD, **kwargs)


def splash_attention(q_BLHD, k_BSKD, v_BSKD, **kwargs):
  """TPU Splash attention (`modeling/kernels/splash.py`): one device, index order only."""
  from modeling.kernels import splash  # imported here: kernels build on this module
  return splash.splash_attention(q_BLHD, k_BSKD, v_BSKD, **kwargs)


# Single-device kernels by `attention.impl`; training/ wraps them for context parallelism.
KERNELS = {
    'xla': xla_attention,
    'jax_nn': jax_nn_attention,
    'blockwise': blockwise_attention,
    'pallas': pallas_attention,
}
# Kernels that run only on their accelerator (tests loop over KERNELS on CPU).
TPU_KERNELS = {'splash': splash_attention}
# Kernels that take attention.block_q / block_kv.
TILED = ('blockwise', 'pallas', 'splash')
