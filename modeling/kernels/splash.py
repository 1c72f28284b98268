"""`attention.impl='splash'`: JAX's TPU Splash attention kernel, where its masks fit.

Splash (`jax.experimental.pallas.ops.tpu.splash_attention`, what MaxText runs on TPU) knows
segment ids and masks by array index (causal, local window), not positions. It is exact when
positions increase with the index inside every segment: one device, no zigzag layout, which
`training/composition.py` guarantees by using it only with `parallelism.context_impl='none'`.
(Padding tokens, segment 0 at position 0, then see only earlier padding instead of all of it:
that changes only padding outputs, which carry no loss.) Context-parallel rings on TPU use the
blockwise per-block kernel.

Runs on TPU; elsewhere only in Pallas interpret mode (`interpret=True`, used by the tests
where the installed jax supports it). Not run on a TPU in this project yet.
"""

import functools

import jax
import jax.numpy as jnp

from modeling import blockwise


@functools.lru_cache(maxsize=32)
def _kernel(L: int, S: int, H: int, causal: bool, window: int, bq: int, bk: int,
            interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  if window:
    mask = sm.LocalMask((L, S), window_size=(window - 1, 0 if causal else window - 1), offset=0)
  elif causal:
    mask = sm.CausalMask((L, S))
  else:
    mask = sm.FullMask((L, S))
  sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                        block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  return sk.make_splash_mha(sm.MultiHeadMask([mask] * H), block_sizes=sizes, head_shards=1,
                            q_seq_shards=1, interpret=interpret), sk.SegmentIds


def splash_attention(q_BLHD, k_BSKD, v_BSKD, *, q_segment_ids, kv_segment_ids, q_positions,
                     kv_positions, causal, window=0, block_q: int = 512, block_kv: int = 512,
                     interpret: bool = False):
  """An `AttendFn` for one device in index order (see the module docstring)."""
  del q_positions, kv_positions  # index order: the mask by index equals the mask by position
  B, L, H, D = q_BLHD.shape
  S = k_BSKD.shape[1]
  bq = blockwise.fit_block(L, block_q, 'attention.block_q')
  bk = blockwise.fit_block(S, block_kv, 'attention.block_kv')
  kernel, segment_ids = _kernel(L, S, H, causal, int(window), bq, bk, interpret)
  q = (q_BLHD * jnp.asarray(D ** -0.5, q_BLHD.dtype)).transpose(0, 2, 1, 3)  # unscaled kernel
  k, v = k_BSKD.transpose(0, 2, 1, 3), v_BSKD.transpose(0, 2, 1, 3)
  one = lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=segment_ids(q=qs, kv=ks))
  out = jax.vmap(one)(q, k, v, jnp.asarray(q_segment_ids, jnp.int32),
                      jnp.asarray(kv_segment_ids, jnp.int32))
  return out.transpose(0, 2, 1, 3)
