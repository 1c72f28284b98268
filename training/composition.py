"""The composition root: picks the attention implementation, the recurrent layers' token-order
ops and the activation sharding for a run, and hands them to the model (models never see a
mesh). It also refuses, at start-up, every way of splitting a sequence that a model's layers
cannot follow (`check_token_order`)."""

import functools
import logging

import ml_collections
from jax.sharding import Mesh

from modeling import attention as attention_lib
from modeling import registry, ssm
from modeling.transformer import Runtime
from parallelism import context as context_lib
from parallelism import disaggregation_attend
from parallelism import rules as rules_lib
from parallelism.context import layout as context_layout
from parallelism.context import scan as context_scan
from parallelism.context import shared_kv as context_shared_kv
from parallelism.context import window as context_window

log = logging.getLogger(__name__)


CONTEXT_IMPLS = (*context_lib.IMPLS, 'disaggregated')

log = logging.getLogger('loomax')


def _kernel(config: ml_collections.ConfigDict):
  """The single-device attention kernel named by `attention.impl`."""
  impl = config.attention.impl
  if impl not in attention_lib.KERNELS:
    raise ValueError(f'attention.impl={impl!r}; valid: {sorted(attention_lib.KERNELS)}')
  kernel = attention_lib.KERNELS[impl]
  if impl == 'blockwise':
    kernel = functools.partial(kernel, block_q=config.attention.block_q,
                               block_kv=config.attention.block_kv)
  return kernel


def make_attend(config: ml_collections.ConfigDict, mesh: Mesh):
  impl = config.attention.impl
  kernel = _kernel(config)
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
  ring = context_lib.make_context_attend(config, mesh, kernel)
  # Causal window layers whose window fits one local chunk take one hop instead of the ring.
  p = config.parallelism
  return context_window.with_window_halo(
      ring, kernel, mesh, p.rules, context=context_layout.context_size(mesh, p.rules),
      zigzag=context_layout.uses_zigzag(config, mesh),
      block_kv=config.attention.block_kv if impl == 'blockwise' else 0)


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
  # (`hybrid_exec.GroupRecurrence`, plans made with whole_groups=True).
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
  s = config.model.sambay
  return context_scan.ContextRecurrence(
      mesh, p.rules, ssm.make_scan(s.scan_impl, s.scan_chunk),
      zigzag=context_layout.uses_zigzag(config, mesh), chunk=s.scan_chunk)


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
  return context_shared_kv.GatheredKV(mesh, p.rules, _kernel(config))


def make_runtime(config: ml_collections.ConfigDict, mesh: Mesh) -> Runtime:
  check_token_order(config, mesh)
  return Runtime(attend=make_attend(config, mesh),
                 constrain=rules_lib.make_constrain(mesh, config.parallelism.rules),
                 recurrence=make_recurrence(config, mesh),
                 shared_kv=make_shared_kv(config, mesh))
