"""Context parallelism: attention over a sequence split across the mesh's context axis.

`parallelism.context_impl` picks the strategy behind the attention seam:
  allgather   gather K/V, local queries (`allgather.py`)
  ring        K/V travel a ring, double buffered, custom-VJP backward (`ring.py`)
  token_ring  queries travel, partial outputs come straight back, pipelined (`token_ring.py`)
  auto        ring or token_ring per layer by a step-time model (`cost.py`)
All run the per-block kernel `attention.impl` selects (`modeling/kernels/`). The causal load
balance is the zigzag data layout (`layout.py`), applied once on the host.
"""

import ml_collections
from jax.sharding import Mesh

from modeling.attention import AttendFn
from modeling.kernels import BlockKernel
from parallelism.context import allgather, cost, ring, token_ring
from parallelism.context.sharded import shard_attend

IMPLS = ('none', 'allgather', 'ring', 'token_ring', 'auto')


def _auto_local(kernel: BlockKernel, zigzag: bool, full_duplex: bool):
  impls = {'ring': ring.make_local(kernel.block_q, kernel.block_kv, zigzag, kernel),
           'token_ring': token_ring.make_local(kernel.block_q, kernel.block_kv, zigzag, kernel)}

  def local(q, k, v, *args, axis, **kwargs):
    # Per call, so each layer (its own heads, kv heads, head dim, dtype) gets its own choice.
    pick = cost.choose(q.shape[2], k.shape[2], q.shape[3], q.dtype.itemsize,
                       full_duplex=full_duplex, tokens=q.shape[1], n=axis.size)
    return impls[pick](q, k, v, *args, axis=axis, **kwargs)

  return local


def make_context_attend(config: ml_collections.ConfigDict, mesh: Mesh,
                        kernel: BlockKernel | None = None) -> AttendFn:
  """The context-parallel `AttendFn` for `config.parallelism.context_impl` (not 'none'), with
  `kernel` as the per-block kernel (default: blockwise with the configured tiles)."""
  p, a = config.parallelism, config.attention
  kernel = kernel or BlockKernel('blockwise', a.block_q, a.block_kv)
  impl = p.context_impl
  if impl == 'allgather':
    local = allgather.make_local(kernel, p.zigzag)
  elif impl == 'ring':
    local = ring.make_local(kernel.block_q, kernel.block_kv, p.zigzag, kernel)
  elif impl == 'token_ring':
    local = token_ring.make_local(kernel.block_q, kernel.block_kv, p.zigzag, kernel)
  elif impl == 'auto':
    local = _auto_local(kernel, p.zigzag, p.context_full_duplex)
  else:
    raise ValueError(f'parallelism.context_impl={impl!r}; valid: {list(IMPLS)}')
  return shard_attend(local, mesh, p.rules)
