"""The composition root: picks the attention implementation and activation sharding for a run
and hands them to the model (models never see a mesh)."""

import functools
import logging

import ml_collections
from jax.sharding import Mesh

from modeling import attention as attention_lib
from modeling.transformer import Runtime
from parallelism import context as context_lib
from parallelism import disaggregation_attend
from parallelism import rules as rules_lib


CONTEXT_IMPLS = (*context_lib.IMPLS, 'disaggregated')

log = logging.getLogger('loomax')


def make_attend(config: ml_collections.ConfigDict, mesh: Mesh):
  impl = config.attention.impl
  if impl not in attention_lib.KERNELS:
    raise ValueError(f'attention.impl={impl!r}; valid: {sorted(attention_lib.KERNELS)}')
  kernel = attention_lib.KERNELS[impl]
  if impl == 'blockwise':
    kernel = functools.partial(kernel, block_q=config.attention.block_q,
                               block_kv=config.attention.block_kv)
  context_impl = config.parallelism.context_impl
  if context_impl not in CONTEXT_IMPLS:
    raise ValueError(f'parallelism.context_impl={context_impl!r}; valid: {list(CONTEXT_IMPLS)}')
  if context_impl == 'none':
    context = mesh.shape.get('context', 1)
    if context > 1:
      log.warning("mesh.context=%d with parallelism.context_impl='none': no context-parallel "
                  'attention; the single-device kernel sees the sharded sequence and XLA '
                  'gathers it as it sees fit. Set parallelism.context_impl (allgather, ring, '
                  'token_ring or auto).', context)
    return kernel
  if context_impl == 'disaggregated':
    return disaggregation_attend.make_attend(config, mesh, kernel)
  return context_lib.make_context_attend(config, mesh, kernel)


def make_runtime(config: ml_collections.ConfigDict, mesh: Mesh) -> Runtime:
  return Runtime(attend=make_attend(config, mesh),
                 constrain=rules_lib.make_constrain(mesh, config.parallelism.rules))
