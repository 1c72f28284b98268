"""The composition root: picks the attention implementation and activation sharding for a run
and hands them to the model (models never see a mesh)."""

import functools
import logging

import jax
import ml_collections
from jax.sharding import Mesh

from modeling import attention as attention_lib
from modeling import kernels
from modeling.kernels import auto as kernel_choice
from modeling.transformer import Runtime
from parallelism import context as context_lib
from parallelism import disaggregation_attend
from parallelism import rules as rules_lib


CONTEXT_IMPLS = (*context_lib.IMPLS, 'disaggregated')
ATTENTION_IMPLS = ('auto', *attention_lib.KERNELS, *attention_lib.TPU_KERNELS)

log = logging.getLogger('loomax')


def _local_shapes(config: ml_collections.ConfigDict, mesh: Mesh):
  """(batch, heads, q_len, kv_len) one device's attention sees, for the 'auto' budget."""
  shape = dict(mesh.shape)
  batch_shards = shape.get('data', 1) * shape.get('fsdp', 1)
  context = shape.get('context', 1) if config.parallelism.context_impl != 'none' else 1
  return (-(-config.batch_size // batch_shards),
          -(-config.model.num_heads // shape.get('tensor', 1)),
          config.seq_len // context, config.seq_len)


def resolve_attention_impl(config: ml_collections.ConfigDict, mesh: Mesh) -> str:
  """attention.impl, with 'auto' resolved for this run's backend and shapes (logged)."""
  impl = config.attention.impl
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f'attention.impl={impl!r}; valid: {list(ATTENTION_IMPLS)}')
  if impl == 'splash' and jax.default_backend() != 'tpu':
    raise ValueError(f"attention.impl='splash' needs a TPU backend (this is "
                     f"{jax.default_backend()}); use auto, pallas or blockwise")
  if impl != 'auto':
    return impl
  batch, heads, q_len, kv_len = _local_shapes(config, mesh)
  pick, why = kernel_choice.choose(jax.default_backend(), batch=batch, heads=heads,
                                   q_len=q_len, kv_len=kv_len,
                                   index_ordered=config.parallelism.context_impl == 'none')
  log.info('attention.impl=auto -> %s (%s)', pick, why)
  return pick


def make_block_kernel(config: ml_collections.ConfigDict) -> kernels.BlockKernel:
  """The per-block kernel the context-parallel implementations call (logged)."""
  pick, why = kernel_choice.block_impl(config.attention.impl, jax.default_backend())
  log.info('context-parallel per-block kernel: %s (%s)', pick, why)
  return kernels.BlockKernel(pick, config.attention.block_q, config.attention.block_kv,
                             interpret=pick == 'pallas' and kernels.on_cpu())


def make_attend(config: ml_collections.ConfigDict, mesh: Mesh):
  impl = resolve_attention_impl(config, mesh)
  context_impl = config.parallelism.context_impl
  if context_impl not in CONTEXT_IMPLS:
    raise ValueError(f'parallelism.context_impl={context_impl!r}; valid: {list(CONTEXT_IMPLS)}')
  kernel = {**attention_lib.KERNELS, **attention_lib.TPU_KERNELS}[impl]
  if impl in attention_lib.TILED:
    kernel = functools.partial(kernel, block_q=config.attention.block_q,
                               block_kv=config.attention.block_kv)
  if context_impl == 'none':
    if impl == 'jax_nn':  # one device, index order: cuDNN may take causal by index
      kernel = functools.partial(kernel, index_ordered=True)
    return kernel
  # Index-masked kernels (jax_nn's cuDNN path, splash) never see a context-parallel layout:
  # the rings and the disaggregated plan call the per-block kernel below instead.
  block = make_block_kernel(config)
  if context_impl == 'disaggregated':
    return disaggregation_attend.make_attend(config, mesh, kernels.attend(block))
  return context_lib.make_context_attend(config, mesh, block)


def make_runtime(config: ml_collections.ConfigDict, mesh: Mesh) -> Runtime:
  return Runtime(attend=make_attend(config, mesh),
                 constrain=rules_lib.make_constrain(mesh, config.parallelism.rules))
