"""`attention.impl='jax_nn'`: `jax.nn.dot_product_attention`, cuDNN flash attention on GPU
where its masks can say what ours say.

cuDNN (through jax.nn, jax 0.10.2) knows causal-by-index and local windows by index, and
padding by sequence lengths; not positions and not packed segments. With `index_ordered`
(the caller promises positions increase with the index inside every segment: one device, no
zigzag), causal attention with or without a window goes to cuDNN as `is_causal` and
`local_window_size`:
  packed=False  nothing else: cuDNN's O(L) flash attention (padding at the end of a row, the
                pipeline's, then only changes padding outputs, which carry no loss)
  packed=True   the segment mask as well, which jax.nn turns into a dense [B, 1, L, S] bias
                (O(L^2) memory, and a bias gradient: jax issue 30593); reported as a fallback
Otherwise (not causal, not index ordered, a head dim or dtype cuDNN does not take, or not a
GPU) jax.nn's XLA path runs with the full position mask: dense O(L^2) attention. On GPU that
changes the memory class and is reported as a fallback (`policy.fallback`: WARNING once, an
error under attention.strict=True); on CPU/TPU jax.nn is XLA by design (INFO).

`return_residual=True` makes cuDNN return the log-sum-exp as well (`cudnn_forward`), which
is what a per-block ring step needs for its merge; the rings do not use it (yet) because a
ring step's mask is by position across a permuted, split sequence, which cuDNN's index masks
cannot express, and jax.nn's backward recomputes from its own lse, not the final one a ring
step must use (`modeling/kernels/__init__.py` describes the per-block contract).
"""

import logging

import jax
import jax.numpy as jnp

from modeling.kernels import policy
from modeling.masking import attention_mask

log = logging.getLogger('loomax')

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_expresses(*, backend: str, causal: bool, index_ordered: bool, head_dim: int,
                    dtype) -> tuple[bool, str]:
  """(can cuDNN through jax.nn run this exactly, why not)."""
  if backend != 'gpu':
    return False, f'not a GPU backend ({backend})'
  if not causal:
    return False, 'not causal (cuDNN masks by index only; segments would need a dense mask)'
  if not index_ordered:
    return False, 'positions not in index order (context parallel / zigzag)'
  if head_dim > 128 or head_dim % 8:
    return False, f'head dim {head_dim} (cuDNN: a multiple of 8, at most 128)'
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
    return False, f'dtype {jnp.dtype(dtype).name} (cuDNN: bfloat16 or float16)'
  return True, ''


def _window(window: int):
  return (window - 1, 0) if window else None


def cudnn_forward(q_BLHD, k_BSKD, v_BSKD, *, causal: bool, window: int = 0):
  """(o, lse [B, L, H] float32) from cuDNN with `return_residual=True` (unpacked rows)."""
  o, lse = jax.nn.dot_product_attention(
      q_BLHD, k_BSKD, v_BSKD, is_causal=causal, local_window_size=_window(window),
      implementation='cudnn', return_residual=True)
  return o, lse.astype(jnp.float32)


def jax_nn_attention(q_BLHD, k_BSKD, v_BSKD, *, q_segment_ids, kv_segment_ids, q_positions,
                     kv_positions, causal, window=0, index_ordered: bool = False,
                     packed: bool = True, strict: bool = False):
  """An `AttendFn` (see the module docstring for which path runs and how it is reported)."""
  backend = jax.default_backend()
  ok, why = cudnn_expresses(backend=backend, causal=causal, index_ordered=index_ordered,
                            head_dim=q_BLHD.shape[-1], dtype=q_BLHD.dtype)
  if ok and not packed:
    log.info('attention jax_nn: cuDNN (is_causal, window %d, no mask)', window)
    return jax.nn.dot_product_attention(q_BLHD, k_BSKD, v_BSKD, is_causal=True,
                                        local_window_size=_window(window),
                                        implementation='cudnn')
  if ok:
    policy.fallback('attention.impl=jax_nn: packed segments reach cuDNN as a dense [B, 1, L, S] '
                    'mask bias (O(L^2) memory, bias gradient; jax issue 30593): '
                    'attention.impl=pallas keeps O(L) memory', strict=strict)
    seg_BLS = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return jax.nn.dot_product_attention(
        q_BLHD, k_BSKD, v_BSKD, mask=seg_BLS[:, None], is_causal=True,
        local_window_size=_window(window), implementation='cudnn')
  if backend == 'gpu':
    policy.fallback(f'attention.impl=jax_nn: cuDNN cannot run this ({why}); jax.nn\'s XLA path '
                    'materialises the dense O(L^2) scores: attention.impl=pallas keeps O(L) '
                    'memory', strict=strict)
  else:
    log.info('attention jax_nn: XLA implementation (%s)', why)
  mask_BLS = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                            causal=causal, window=window)
  return jax.nn.dot_product_attention(q_BLHD, k_BSKD, v_BSKD, mask=mask_BLS[:, None],
                                      implementation='xla')
