"""Per-device attention work of a context-parallel layout, from the kernel's own block schedule.

Counts the (query block, key block) pairs the blockwise kernel computes (`block_table`: pairs
it cannot prove fully masked) on each context device: ring and all-gather compute the pairs
of their local queries, TokenRing the pairs of their local keys. Deterministic and cheap
(host-side, no attention is run), it is how the zigzag balance (Brandon et al., "Striped
Attention", 2023, section 3; zhuzilin/ring-flash-attention) is measured in
`scripts/bench_context.py`.
"""

import numpy as np

from modeling.blockwise import block_table, fit_block


def attention_flops(segment_ids_BL, positions_BL, n: int, *, heads: int, head_dim: int,
                    causal: bool = True, window: int = 0, block: int = 512,
                    owner: str = 'query', chunks_per_device: int = 2) -> np.ndarray:
  """Forward attention FLOPs (QK^T and PV, 4 x bq x bk x H x D per computed block) per device.

  `owner` = 'query' (ring, all-gather) or 'key' (TokenRing); the arrays are in the layout the
  devices hold (e.g. zigzag), device d holding the d-th 1/n of each row.
  """
  L = segment_ids_BL.shape[1]
  b = fit_block(L // (n * chunks_per_device), block, 'attention.block_q')
  live = np.asarray(block_table(segment_ids_BL, segment_ids_BL, positions_BL, positions_BL,
                                causal=causal, window=window, block_q=b, block_kv=b))
  per_device = L // n // b
  axis = 1 if owner == 'query' else 0
  counts = live.sum(axis=axis).reshape(n, per_device).sum(-1)
  return counts.astype(np.float64) * 4 * b * b * heads * head_dim


def imbalance(flops: np.ndarray) -> float:
  """max / mean over devices: 1.0 is perfect balance, n means one device does everything."""
  return float(flops.max() / flops.mean())
