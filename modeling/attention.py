"""The attention seam: every model computes core attention through one `AttendFn`.

Which implementation runs (plain XLA, `jax.nn.dot_product_attention`, blockwise, Pallas, or
a context-parallel one from `parallelism/context/`) is chosen by config in `training/` and
handed to the model, so one strategy serves every family. The implementations and their one
registry live in `modeling/kernels/`; the mask rule (by segment ids and positions, so it
holds under packing and any permutation of the sequence) in `modeling/masking.py`. This
module re-exports the names models and tests use.
"""

from typing import Protocol

import jax

from modeling.kernels import KERNELS, REGISTRY, TILED, TPU_KERNELS  # noqa: F401
from modeling.kernels import blockwise_attention, pallas_attention  # noqa: F401
from modeling.kernels import splash_attention  # noqa: F401
from modeling.kernels.dense import xla_attention  # noqa: F401
from modeling.kernels.jax_nn import jax_nn_attention  # noqa: F401
from modeling.masking import MASK_VALUE, attention_mask  # noqa: F401


class AttendFn(Protocol):

  def __call__(self, q_BLHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, *,
               q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
               q_positions: jax.Array, kv_positions: jax.Array,
               causal: bool, window: int = 0) -> jax.Array:
    """Softmax(q k^T / sqrt(D) + mask) v with H query heads sharing K key/value heads."""
    ...


def self_attention_kwargs(segment_ids_BL, positions_BL, attn_plan=None) -> dict:
  """The keyword arguments of an `AttendFn` call for self-attention, plus the per-batch plan
  (`attn_plan=`) only when there is one: only plan-reading attend fns (disaggregated) take it,
  so every other AttendFn keeps the plain signature."""
  kwargs = dict(q_segment_ids=segment_ids_BL, kv_segment_ids=segment_ids_BL,
                q_positions=positions_BL, kv_positions=positions_BL)
  if attn_plan is not None:
    kwargs['attn_plan'] = attn_plan
  return kwargs
