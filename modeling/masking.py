"""The attention mask rule, a leaf module every attention implementation imports.

Masking is by segment ids and positions rather than by array index: token i may see token j
when both are in the same segment and, if causal, pos_i >= pos_j (and, with a sliding window,
pos_i - pos_j < window). That stays correct under packing and under any permutation of the
sequence (the zigzag layout of ring attention).
"""

import jax

# Finite, so fully masked rows give a uniform softmax instead of NaN (see JAX_NOTES).
MASK_VALUE = -1e30


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
