"""The composition root: picks the attention implementation, the recurrent layers' token-order
ops and the activation sharding for a run, and hands them to the model (models never see a
mesh). It also refuses, at start-up, every way of splitting a sequence that a model's layers
cannot follow (`check_token_order`)."""

import logging

import jax
import ml_collections
from jax.sharding import Mesh

from modeling import attention as attention_lib
from modeling import kernels, registry
from modeling.kernels import auto as kernel_choice
from modeling.runtime import Runtime, sequential
from parallelism import context as context_lib
from parallelism import disaggregation_attend
from parallelism import rules as rules_lib
from parallelism.context import layout as context_layout
from parallelism.context import scan as context_scan
from parallelism.context import shared_kv as context_shared_kv
from parallelism.context import window as context_window
from parallelism.hybrid import groups as hybrid_groups

CONTEXT_IMPLS = (*context_lib.IMPLS, 'disaggregated')

log = logging.getLogger('loomax')


ATTENTION_IMPLS = ('auto', *attention_lib.KERNELS, *attention_lib.TPU_KERNELS)


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
                                   index_ordered=config.parallelism.context_impl == 'none',
                                   packed=config.attention.rows_packed)
  log.info('attention.impl=auto -> %s (%s)', pick, why)
  return pick


def make_block_kernel(config: ml_collections.ConfigDict) -> kernels.BlockKernel:
  """The per-block kernel the context-parallel implementations call (logged)."""
  return kernel_choice.make_block_kernel(config.attention)


def _context_kernel(config: ml_collections.ConfigDict):
  """(per-block kernel, its single-device `AttendFn`, key tile its key lengths must divide;
  0 = any) for code that runs a kernel on a context-parallel layout (window halo, shared K/V,
  disaggregated tasks): masks by position, so index-masked kernels (jax_nn's cuDNN path,
  splash) never see a permuted or split sequence."""
  block = make_block_kernel(config)
  tile = {'xla': 0, 'pallas': min(block.block_kv, kernels.pallas_block_cap())}.get(
      block.impl, block.block_kv)
  return block, kernels.attend(block), tile


def make_attend(config: ml_collections.ConfigDict, mesh: Mesh):
  impl = resolve_attention_impl(config, mesh)
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
    return kernel_choice.single_device(config.attention, impl)
  block, kernel, tile = _context_kernel(config)
  if context_impl == 'disaggregated':
    return disaggregation_attend.make_attend(config, mesh, block)
  ring = context_lib.make_context_attend(config, mesh, block)
  # Causal window layers whose window fits one local chunk take one hop instead of the ring.
  p = config.parallelism
  return context_window.with_window_halo(
      ring, kernel, mesh, p.rules, context=context_layout.context_size(mesh, p.rules),
      zigzag=context_layout.uses_zigzag(config, mesh), block_kv=tile)


def _config_value(config: ml_collections.ConfigDict, key: str):
  node = config
  for part in key.split('.'):
    node = node.get(part, 0) if hasattr(node, 'get') else 0
  return node


def check_token_order(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """Every run that splits or permutes a sequence must have layers that can follow the split:
  a clear error naming the layer type and the key to change, before anything is compiled."""
  name = config.model.name
  family = registry.get_family(name)
  p = config.parallelism
  if p.context_impl == 'disaggregated':
    window = _config_value(config, family.window_key)
    if window:
      raise ValueError(
          f"parallelism.context_impl='disaggregated' supports causal attention without a "
          f"sliding window, but model.name={name!r} has {family.window_key}={window}"
          + (" (its self-decoder's window-attention layers always use one)"
             if family.window_key != 'model.sliding_window' else '')
          + ": use parallelism.context_impl='ring' (or 'none')")
  layers = family.order_dependent_layers
  if not layers:
    return
  kinds = ', '.join(layers)
  n = context_layout.context_size(mesh, p.rules)
  if n > 1 and not family.uses_recurrence_seam:
    raise ValueError(
        f'mesh.context={n} splits each sequence (parallelism.context_impl={p.context_impl!r}, '
        f'parallelism.zigzag={p.zigzag}), but model.name={name!r} has {kinds} layers that '
        'follow array order and have no context-parallel form: set mesh.context=1')
  h = p.hybrid_dp
  # With the seam, hybrid-DP groups run the context scan and conv halo per group
  # (`parallelism.hybrid.groups.GroupRecurrence`, plans made with whole_groups=True).
  if h.enabled and max(h.layouts) > 1 and not family.uses_recurrence_seam:
    raise ValueError(
        f'parallelism.hybrid_dp.layouts={tuple(h.layouts)} cuts documents into zigzag pieces '
        f'over groups of up to {max(h.layouts)} devices, but model.name={name!r} has {kinds} '
        'layers that follow array order and have no context-parallel form: set '
        'parallelism.hybrid_dp.layouts=(1,) (whole documents per device)')


def make_recurrence(config: ml_collections.ConfigDict, mesh: Mesh):
  """The recurrent layers' token-order ops: None (the model's own single-device scan) unless
  the sequence is split over a context axis, then the distributed scan and conv halo."""
  family = registry.get_family(config.model.name)
  p = config.parallelism
  if not family.uses_recurrence_seam or context_layout.context_size(mesh, p.rules) == 1:
    return None
  scan_fn, chunk = family.recurrence_scan(config.model)
  return context_scan.ContextRecurrence(
      mesh, p.rules, scan_fn, zigzag=context_layout.uses_zigzag(config, mesh), chunk=chunk)


def make_shared_kv(config: ml_collections.ConfigDict, mesh: Mesh):
  """K/V read by several layers (SambaY's cross-decoder): gathered once over the context axis
  when context parallel (and the kv heads split evenly over the head shards), else None
  (every reader calls the runtime's attention)."""
  p = config.parallelism
  if p.context_impl not in context_lib.IMPLS or p.context_impl == 'none':
    return None
  if context_layout.context_size(mesh, p.rules) == 1:
    return None
  heads = rules_lib.logical_to_spec(('act_heads',), p.rules, mesh)[0]
  if config.model.num_kv_heads % rules_lib.mesh_axes_size(mesh, heads):
    log.warning('shared K/V: model.num_kv_heads=%d does not divide over the head shards; '
                'each cross-attention layer uses parallelism.context_impl=%r on its own',
                config.model.num_kv_heads, p.context_impl)
    return None
  return context_shared_kv.GatheredKV(mesh, p.rules, _context_kernel(config)[1])


def make_group_runtime(config: ml_collections.ConfigDict, layout: tuple[int, ...],
                       pool: int) -> Runtime:
  """The per-device runtime of a hybrid-DP micro-batch layout (inside the pool's shard_map,
  `training/hybrid/executor.py`): the zigzag ring among each group's members and, for recurrent
  layers with g > 1, the group's context-parallel scan (else the model's own local scan).
  Shared K/V stays None: each reader runs the group ring."""
  a = config.attention
  family = registry.get_family(config.model.name)
  recurrence = None
  if max(layout) > 1 and family.uses_recurrence_seam:
    scan_fn, chunk = family.recurrence_scan(config.model)
    recurrence = hybrid_groups.GroupRecurrence(
        hybrid_groups.GroupAxis(hybrid_groups.POOL, max(layout), pool), scan_fn, chunk)
  return Runtime(attend=hybrid_groups.group_attend(layout, pool, a.block_q, a.block_kv),
                 recurrence=recurrence)


def make_runtime(config: ml_collections.ConfigDict, mesh: Mesh) -> Runtime:
  check_token_order(config, mesh)
  return Runtime(attend=make_attend(config, mesh),
                 constrain=rules_lib.make_constrain(mesh, config.parallelism.rules),
                 recurrence=make_recurrence(config, mesh),
                 shared_kv=make_shared_kv(config, mesh),
                 flatten_tokens=not _length_sharded(config, mesh),
                 layer_schedule=make_layer_schedule(config, mesh))


def make_layer_schedule(config: ml_collections.ConfigDict, mesh: Mesh):
  """How a layer's stages run: DistCA's ping-pong over nano-batches under disaggregated
  attention with `parallelism.dca_ping_pong='layer'`, else pre -> attend -> post
  (`modeling.runtime.sequential`; with 'attention' the nano-batches ping-pong inside the
  attention op only)."""
  p = config.parallelism
  if p.context_impl != 'disaggregated':
    return sequential
  mode = p.dca_ping_pong
  if mode not in ('layer', 'attention'):
    raise ValueError(f"parallelism.dca_ping_pong={mode!r}; valid: 'layer', 'attention'")
  if mode == 'attention':
    return sequential
  block, _, _ = _context_kernel(config)
  return disaggregation_attend.make_ping_pong(config, mesh, block)


def _length_sharded(config: ml_collections.ConfigDict, mesh: Mesh) -> bool:
  """Whether the activations' sequence dimension is split over devices (then the model keeps
  [batch, length] separate instead of merging them into one token dimension)."""
  axes = dict(config.parallelism.rules).get('length')
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return any(mesh.shape.get(a, 1) > 1 for a in axes)
