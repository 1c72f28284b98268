"""`attention.impl='auto'`: which single-device kernel a run gets, from the backend and shapes.

  GPU          the fused Pallas kernel (O(L) memory, packing, windows, GQA)
  TPU          Splash attention on one device in index order (no context parallelism) when
               the lengths are multiples of 128; otherwise as CPU
  CPU          plain XLA attention while the float32 [L, S] scores of one layer (per device:
               local batch x local heads x L x S x 4 bytes) stay under `SCORES_BUDGET`;
               blockwise beyond it (XLA keeps the scores for the backward pass, so a 65,536-
               token sequence would ask for hundreds of GB)

Context parallel rings need a per-block kernel with a log-sum-exp: `block_impl` maps the
attention impl to one (`pallas` on GPU, `blockwise` elsewhere under auto).
The logits budget of the loss (`attention.loss_chunk=-1`) lives in `training/loss.py`.
"""

SCORES_BUDGET = 1 << 30  # bytes of float32 scores one layer may materialise per device


def choose(backend: str, *, batch: int, heads: int, q_len: int, kv_len: int,
           budget: int = SCORES_BUDGET, index_ordered: bool = False) -> tuple[str, str]:
  """(impl, reason) for attention.impl='auto'; `index_ordered`: one device, no zigzag."""
  if backend == 'gpu':
    return 'pallas', 'GPU: fused Pallas flash kernel'
  if backend == 'tpu' and index_ordered and q_len % 128 == 0 and kv_len % 128 == 0:
    return 'splash', 'TPU, one device in index order: Splash attention'
  scores = 4 * batch * heads * q_len * kv_len
  if scores <= budget:
    return 'xla', f'{backend}: scores {scores / 2**20:.0f} MiB <= budget {budget / 2**20:.0f} MiB'
  return 'blockwise', (f'{backend}: scores {scores / 2**20:.0f} MiB > budget '
                       f'{budget / 2**20:.0f} MiB')


def block_impl(impl: str, backend: str) -> tuple[str, str]:
  """(per-block kernel, reason) for context-parallel attention with attention.impl=impl."""
  if impl in ('blockwise', 'pallas', 'xla'):
    return impl, 'as configured'
  if impl == 'splash':
    return 'blockwise', 'Splash masks by index, not position; the ring steps use blockwise'
  if impl == 'jax_nn':
    return 'xla', 'jax_nn returns no log-sum-exp; the ring steps use the dense xla block kernel'
  return ('pallas', 'GPU: fused Pallas kernel') if backend == 'gpu' else (
      'blockwise', f'{backend}: blockwise per block')
