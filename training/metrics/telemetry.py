"""Run telemetry for TensorBoard and metrics.jsonl: padding, attention balance, communication,
compiled memory and CART's loop states.

Once at start-up, from the compiled train step (no execution):
  comm/<kind>_bytes      bytes one device sends per step (mean over devices), from the optimized
                         HLO with while-loop trip counts (perf.collective_bytes_by_kind):
                         gradients = all-reduce + reduce-scatter, param_gather = all-gather,
                         ring_kv = collective-permute (context-parallel K/V), all_to_all
                         (disaggregated attention); comm/total_bytes and comm/max_device_bytes
  mem/compiled_*_bytes   per-device memory of the compiled step (memory_analysis: temp,
                         arguments, outputs, total = temp + args + outputs - aliased)
Per logged window, from the host batches actually run (averaged over the window's steps):
  data/real_token_fraction, data/padding_fraction   tokens in a document vs padding slots
  balance/attn_flops_max, _mean, balance/attn_imbalance
                         forward attention FLOPs per device and attention layer: a token at
                         position p in its document attends to min(p + 1, window) keys, 4 x H x
                         Dh FLOPs each; devices hold rows over the batch axes and, in the stored
                         layout (zigzag when context parallel), 1/n of each row over the
                         context axis. Disaggregated attention: the planner's per-device pairs
                         after moving work. Hybrid DP reports its own (hdp/*).
  dca/*                  disaggregated attention, per planned batch: executed_imbalance (max /
                         mean of the block pairs the kernel computes per device, after moves;
                         _before: without moves), executed_vs_dp (mean executed work / data
                         parallelism's with the same per-row kernel), modelled_imbalance (exact
                         causal query-key pairs, the paper's FLOPs; _before), moved_blocks,
                         bytes_sent_mean / _max (bytes one device sends per attention layer,
                         forward: the ragged exchange's planned rows, which are what travels;
                         the backward sends as much again), executed_block_pairs_max,
                         q_buffer_use / kv_buffer_use (the fullest send or receive buffer:
                         rows used / parallelism.dca_q_capacity, dca_kv_capacity rows)
At logging steps, the model family's batch diagnostics on the logged batch (registry
`Family.batch_diagnostics`; one extra forward pass per log row), e.g. CART's
cart/state_rms_loop_<r>, the RMS of the state after core application r.

Which figures a strategy reports is the program's choice (`TrainProgram.telemetry()`):
`Telemetry` for a static mesh, `DisaggregatedTelemetry` (the planner's per-device work),
`NoTelemetry` for hybrid DP (its step reports hdp/* itself).
"""

import logging

import jax
import numpy as np

from modeling import registry
from parallelism import disaggregation
from training import step as step_lib
from training.metrics import perf

log = logging.getLogger('loomax')

COMM_KINDS = {'gradients': ('all-reduce', 'reduce-scatter'), 'param_gather': ('all-gather',),
              'ring_kv': ('collective-permute',), 'all_to_all': ('all-to-all',)}


def compiled_figures(compiled, num_devices: int) -> dict[str, float]:
  """comm/* and mem/* of a compiled step (see the module docstring)."""
  by_op = perf.collective_bytes_by_kind(compiled.as_text(), num_devices)
  row = {f'comm/{kind}_bytes': float(sum(by_op[o] for o in ops).mean())
         for kind, ops in COMM_KINDS.items()}
  total = sum(by_op.values())
  row['comm/total_bytes'] = float(total.mean())
  row['comm/max_device_bytes'] = float(total.max())
  for part, v in perf.compiled_memory(compiled).items():
    row[f'mem/compiled_{part}_bytes'] = float(v)
  return row


def attention_flops_per_device(segment_ids_BL, positions_BL, batch_devices: int,
                               context_devices: int, *, heads: int, head_dim: int,
                               window: int = 0) -> np.ndarray:
  """Forward attention FLOPs per device and attention layer, [batch_devices * context_devices]
  (see the module docstring); rows and columns as stored (zigzag already applied)."""
  B, L = segment_ids_BL.shape
  keys = np.asarray(positions_BL, np.float64) + 1
  if window:
    keys = np.minimum(keys, window)
  work = np.where(np.asarray(segment_ids_BL) > 0, keys, 0.0) * 4 * heads * head_dim
  if B % batch_devices or L % context_devices:
    raise ValueError(f'batch [{B}, {L}] does not split over {batch_devices} x {context_devices} '
                     'devices')
  return work.reshape(batch_devices, B // batch_devices, context_devices,
                      L // context_devices).sum(axis=(1, 3)).ravel()


class NoTelemetry:
  """The hooks the loop calls, reporting nothing: `startup()` once, `observe(host_batch)` per
  step, `row(params, device_batch)` at each log step."""

  def startup(self) -> dict[str, float]:
    return {}

  def observe(self, host_batch) -> None:
    del host_batch

  def row(self, params, device_batch) -> dict[str, float]:
    del params, device_batch
    return {}


class Telemetry(NoTelemetry):
  """A static-mesh program's telemetry (see the module docstring)."""

  def __init__(self, program):
    config, mesh = program.config, program.mesh
    self.config, self.program = config, program
    self.batch_devices = disaggregation.batch_devices(config, mesh)
    self.context_devices = mesh.devices.size // self.batch_devices // _tensor_size(mesh)
    m = config.model
    family = registry.get_family(m.name)
    self.attn = dict(heads=m.num_heads, head_dim=m.head_dim,
                     window=family.balance_window(m))
    self._reset()
    self._diagnostics = None
    if family.batch_diagnostics is not None:
      self._diagnostics = jax.jit(_batch_diagnostics(program.setup.graphdef,
                                                     family.batch_diagnostics),
                                  in_shardings=(program.setup.shardings.params,
                                                program.batch_sharding))

  def _reset(self):
    self._steps, self._sums = 0, {}

  def startup(self) -> dict[str, float]:
    """Compile-time figures of the train step, computed once."""
    compiled = self.program.compiled_train_step()   # the jit cache serves the first step
    try:
      return compiled_figures(compiled, self.program.mesh.devices.size)
    except ValueError as e:   # e.g. a while loop whose trip count XLA does not know
      log.warning('telemetry: comm/mem figures not reported: %s', e)
      return {}

  def observe(self, host_batch: dict[str, np.ndarray]) -> None:
    """Per-step host-side figures of the batch about to run (cheap numpy)."""
    seg = np.asarray(host_batch['segment_ids'])
    add = {'data/real_token_fraction': float((seg > 0).mean())}
    add['data/padding_fraction'] = 1.0 - add['data/real_token_fraction']
    flops, extra = self._device_flops(host_batch)
    add.update(extra)
    if flops is not None:
      add.update({'balance/attn_flops_max': float(flops.max()),
                  'balance/attn_flops_mean': float(flops.mean()),
                  'balance/attn_imbalance': float(flops.max() / max(flops.mean(), 1e-30))})
    for k, v in add.items():
      self._sums[k] = self._sums.get(k, 0.0) + v
    self._steps += 1

  def _device_flops(self, host_batch):
    """(forward attention FLOPs per device or None, further figures of the batch)."""
    # Each process holds only its own rows, which feed its share of the batch devices: the
    # balance figures are over this process's devices (all of them in a single process).
    batch_devices, nproc = self.batch_devices, jax.process_count()
    if nproc > 1:
      if batch_devices % nproc:
        return None, {}
      batch_devices //= nproc
    batch = self.program.host_layout(
        {k: host_batch[k] for k in ('segment_ids', 'positions')})
    return attention_flops_per_device(batch['segment_ids'], batch['positions'],
                                      batch_devices, self.context_devices, **self.attn), {}

  def row(self, params, device_batch) -> dict[str, float]:
    """The window's means since the last row, plus the family's diagnostics on
    `device_batch`."""
    out = {k: v / self._steps for k, v in self._sums.items()} if self._steps else {}
    self._reset()
    if self._diagnostics is not None and device_batch is not None:
      out.update({k: float(v) for k, v in self._diagnostics(params, device_batch).items()})
    return out


class DisaggregatedTelemetry(Telemetry):
  """Balance from the planner: the per-device pairs after moving work, and dca/*."""

  def _device_flops(self, host_batch):
    # mesh.context is 1 here, so the host batch is the layout the planner sees; the program's
    # prepare reuses this plan (the same batch, planned once).
    _, scheds = self.program.planner.plan(host_batch['segment_ids'], host_batch['positions'])
    extra = disaggregation.summary(scheds, *disaggregation.row_bytes(self.config))
    pairs = disaggregation.device_flops(scheds)[1]
    return np.asarray(pairs, np.float64) * 4 * self.attn['heads'] * self.attn['head_dim'], extra


def _tensor_size(mesh) -> int:
  return int(mesh.shape.get('tensor', 1))


def _batch_diagnostics(graphdef, diagnostics):
  """(params, device batch) -> {name: scalar} of the family's diagnostics on that batch."""
  from flax import nnx

  def fn(params, batch):
    model = nnx.merge(graphdef, params)
    return diagnostics(model, batch['inputs'], **step_lib.model_inputs(batch))

  return fn
