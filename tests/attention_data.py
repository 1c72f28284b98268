"""Shared test inputs for attention kernels: GQA tensors, packed and unpacked segment layouts."""

import numpy as np

B, L, H, K, D = 2, 64, 4, 2, 8


def qkv(seed: int = 0):
  r = np.random.RandomState(seed)
  return (r.randn(B, L, H, D).astype(np.float32), r.randn(B, L, K, D).astype(np.float32),
          r.randn(B, L, K, D).astype(np.float32))


def segments(packed: bool):
  """(segment_ids, positions) [B, L]: one document per row, or packed documents and padding."""
  seg = np.ones((B, L), np.int32)
  if packed:
    seg[0, 20:], seg[0, 50:] = 2, 0        # two documents, then padding (segment 0)
    seg[1, 9:], seg[1, 33:], seg[1, 40:] = 2, 3, 4
  pos = np.zeros((B, L), np.int32)
  for t in range(1, L):
    pos[:, t] = np.where(seg[:, t] == seg[:, t - 1], pos[:, t - 1] + 1, 0)
  return seg, pos


def head_weights():
  """A fixed cotangent, so gradients test every output entry with a different weight."""
  return np.sin(np.arange(H * D) + 1.0).reshape(H, D).astype(np.float32)
