"""Hybrid data parallelism as a `TrainProgram` (`training/program.py`): whole documents in,
planned steps out.

ByteScale (Ge et al., 2025), sections 4 and 6. The iterator yields `batch_size` whole
documents (`hybrid_data.make_train_iterator`); the step plans them on the host
(`parallelism/hybrid/planner.py`) and runs the plan (`hybrid_exec.Executor`: one compiled
program per layout). Held-out eval, the state's layout and its birth are the static mesh's
(`static`, packed rows of seq_len). Throughput counts the documents' tokens and reports no
MFU (a token's FLOPs depend on its document's length; the planner's modelled and executed
figures are hdp/*); telemetry is the step's own hdp/* metrics.
"""

import logging

import ml_collections
import numpy as np
from jax.sharding import Mesh

from parallelism.hybrid import planner as hybrid_dp
from training.hybrid import data as hybrid_data, executor as hybrid_exec
from training.metrics import telemetry, throughput
from training.state import ModelSetup, TrainState

log = logging.getLogger('loomax')


class TrainStep:
  """(state, documents) -> (state, metrics): plan on the host, then one program per layout.

  Metrics (`hdp/*`, per step): `modelled_imbalance` (the plan's per-device total FLOPs,
  max/mean), `executed_imbalance` (the same measured from the device buffers that ran,
  `hybrid_dp.buffer_flops`), `lockstep_cost` (sum over micro-batches of the busiest device's
  executed FLOPs / mean per-device total: what synchronous micro-batches pay; 1 = no wait),
  `micro_batches`, `padding_fraction` (token slots computed that hold no token), `programs`
  (compiled programs so far, the update included)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, setup: ModelSetup):
    # The loop runs `check_config` (the data side) at start-up; the executor checks its own.
    self.h = config.parallelism.hybrid_dp
    self.cost = hybrid_dp.CostModel.for_model(config.model)
    self.executor = hybrid_exec.Executor(config, mesh, setup)

  def plan(self, documents) -> hybrid_dp.Plan:
    return hybrid_dp.plan([len(d) for d in documents], self.executor.pool, self.h.capacity,
                          layouts=self.h.layouts, slack=self.h.slack, cost=self.cost,
                          whole_groups=self.executor.whole_groups)

  def __call__(self, state, documents):
    p = self.plan(documents)
    micro = hybrid_dp.batch_buffers(p, documents)
    state, metrics = self.executor.train_step(state, micro)
    executed = np.stack([hybrid_dp.buffer_flops(b, self.cost) for _, b in micro])
    per_device = executed.sum(0)
    metrics = dict(metrics)
    metrics['hdp/modelled_imbalance'] = p.imbalance()
    metrics['hdp/executed_imbalance'] = float(per_device.max() / per_device.mean())
    metrics['hdp/lockstep_cost'] = float(executed.max(1).sum() / per_device.mean())
    metrics['hdp/micro_batches'] = len(p.micro_batches)
    metrics['hdp/padding_fraction'] = p.padding_fraction()
    metrics['hdp/programs'] = self.executor.program_count
    return state, metrics


class HybridProgram:
  """`parallelism.hybrid_dp.enabled`: the hooks of `TrainProgram` for whole documents."""

  def __init__(self, static):
    hybrid_data.check_config(static.config, static.mesh)
    self.static = static
    self.config, self.mesh, self.setup = static.config, static.mesh, static.setup
    self.runtime, self.batch_sharding = static.runtime, static.batch_sharding
    self.eval_step, self.global_batch = static.eval_step, static.global_batch
    self.train_step = TrainStep(static.config, static.mesh, static.setup)

  def init_state(self) -> TrainState:
    return self.static.init_state()

  def compiled_train_step(self):
    """For `dry_run`: the static mesh's step on packed rows of seq_len (the layouts' programs
    compile per plan, at the first batch that uses them)."""
    return self.static.compiled_train_step()

  def train_iterator(self, process_index: int, process_count: int):
    """Batches of whole documents: the same global stream on every process."""
    del process_index, process_count
    return hybrid_data.make_train_iterator(self.config)

  def prepare(self, documents):
    return documents   # the step plans them

  def new_program(self, documents) -> bool:
    # A new layout compiles inside the step; its time stays in the window (hdp/programs).
    del documents
    return False

  def throughput(self, peak: float) -> throughput.Throughput:
    return throughput.Throughput(None, None, peak)

  def real_tokens(self, documents) -> int:
    return throughput.real_tokens(documents)   # every process holds the whole batch

  def telemetry(self) -> telemetry.NoTelemetry:
    log.info('telemetry: hybrid DP compiles one program per layout; comm/mem not reported '
             '(the step reports hdp/*)')
    return telemetry.NoTelemetry()
