"""Which kernel a run gets: `attention.impl='auto'`, the per-block kernel of the rings, and the
fallbacks when the named kernel cannot run a case (reported by `policy.fallback`: WARNING once,
an error under `attention.strict=True`).

`choose` (single device, attention.impl=auto):
  GPU          cuDNN flash attention (`jax.nn.dot_product_attention`, attention.impl=jax_nn)
               when it expresses the case exactly: one device in index order, rows not
               packed (`attention.rows_packed=False`; the data pipeline packs documents,
               so it is True by default),
               a head dim and dtype it takes. Otherwise the fused Pallas kernel (O(L) memory,
               packing, windows, GQA, any position order)
  TPU          Splash attention on one device in index order (no context parallelism) when
               the lengths are multiples of 128; otherwise as CPU
  CPU          plain XLA attention while the float32 [L, S] scores of one layer (per device:
               local batch x local heads x L x S x 4 bytes) stay under `SCORES_BUDGET`;
               blockwise beyond it (XLA keeps the scores for the backward pass, so a 65,536-
               token sequence would ask for hundreds of GB)

`block_impl` (context-parallel rings need a per-block kernel that returns a log-sum-exp and
masks by position): the named kernel when it is one (xla, blockwise, pallas); under auto,
pallas on GPU and blockwise elsewhere; jax_nn and splash mask by index, so their rings run
pallas (GPU) or blockwise: the same O(L x block) memory class, but not the kernel named, so it
is a reported fallback.
The logits budget of the loss (`attention.loss_chunk=-1`) lives in `training/loss.py`.
"""

import functools

import jax

from modeling import kernels
from modeling.kernels import jax_nn, policy

SCORES_BUDGET = 1 << 30  # bytes of float32 scores one layer may materialise per device


def choose(backend: str, *, batch: int, heads: int, q_len: int, kv_len: int,
           budget: int = SCORES_BUDGET, index_ordered: bool = False, packed: bool = True,
           head_dim: int = 128, dtype='bfloat16') -> tuple[str, str]:
  """(impl, reason) for attention.impl='auto'; `index_ordered`: one device, no zigzag."""
  if backend == 'gpu':
    ok, why = jax_nn.cudnn_expresses(backend=backend, causal=True, index_ordered=index_ordered,
                                     head_dim=head_dim, dtype=dtype)
    if ok and not packed:
      return 'jax_nn', 'GPU, one device in index order, unpacked rows: cuDNN flash attention'
    why = why or 'packed rows (cuDNN through jax.nn has no segment ids)'
    return 'pallas', f'GPU: fused Pallas flash kernel (not cuDNN: {why})'
  if backend == 'tpu' and index_ordered and q_len % 128 == 0 and kv_len % 128 == 0:
    return 'splash', 'TPU, one device in index order: Splash attention'
  scores = 4 * batch * heads * q_len * kv_len
  if scores <= budget:
    return 'xla', f'{backend}: scores {scores / 2**20:.0f} MiB <= budget {budget / 2**20:.0f} MiB'
  return 'blockwise', (f'{backend}: scores {scores / 2**20:.0f} MiB > budget '
                       f'{budget / 2**20:.0f} MiB')


def block_impl(impl: str, backend: str, strict: bool = False) -> tuple[str, str]:
  """(per-block kernel, reason) for context-parallel attention with attention.impl=impl."""
  if impl in kernels.BLOCK_IMPLS:
    return impl, 'as configured'
  pick = 'pallas' if backend == 'gpu' else 'blockwise'
  if impl == 'auto':
    return pick, f'{backend}: {pick} per block'
  why = {'splash': 'Splash masks by index, not position',
         'jax_nn': 'cuDNN through jax.nn masks by index, not position'}.get(impl, impl)
  policy.fallback(f'attention.impl={impl} under context parallelism: {why}; the ring steps run '
                  f'the {pick} per-block kernel instead (set attention.impl={pick} to say so)',
                  strict=strict)
  return pick, f'{why}: {pick} per block'


def make_block_kernel(attention, backend: str | None = None) -> kernels.BlockKernel:
  """The per-block kernel the context-parallel implementations call, from the `attention`
  config (impl, tiles, backward tiles, strict)."""
  backend = backend or jax.default_backend()
  pick, why = block_impl(attention.impl, backend, attention.strict)
  policy.log.info('context-parallel per-block kernel: %s (%s)', pick, why)
  return kernels.BlockKernel(pick, attention.block_q, attention.block_kv,
                             interpret=pick == 'pallas' and backend == 'cpu',
                             block_q_bwd=attention.block_q_bwd,
                             block_kv_bwd=attention.block_kv_bwd)


def single_device(attention, impl: str):
  """The single-device `AttendFn` of a resolved `impl` (one device, index order), with the
  configured tiles and strictness bound."""
  entry = kernels.REGISTRY[impl]
  fn = entry.attend
  if entry.tiled:
    fn = functools.partial(fn, block_q=attention.block_q, block_kv=attention.block_kv,
                           block_q_bwd=attention.block_q_bwd,
                           block_kv_bwd=attention.block_kv_bwd)
  if impl == 'jax_nn':  # one device, index order: cuDNN may take causal by index
    fn = functools.partial(fn, index_ordered=True, packed=attention.rows_packed,
                           strict=attention.strict)
  return fn
