"""The one composition root's output: a config compiled onto a mesh as a `TrainProgram`, the
strategy object the loop drives (and the benchmarks and tests build).

`build_program(config, mesh)` returns the program of the configured strategy:

  TrainProgram           static mesh: packed rows, one jitted step; zigzag host layout under
                         context parallelism
  DisaggregatedProgram   static mesh plus DistCA's per-batch task plan: host-side prepare
                         plans each batch and the plan travels in the device batch
                         ('dca_*' arrays, an explicit step input)
  HybridProgram          hybrid data parallelism (`training/hybrid/program.py`): whole documents
                         planned per batch, one compiled program per layout

Each provides the same hooks (`Program`): `train_iterator` (what the data pipeline feeds), `prepare`
(host batch -> device batch), `train_step`, `eval_step`, `throughput` (tokens and FLOPs per
step), `real_tokens`, and `telemetry()` (start-up figures, per-batch observe, per-row
figures). The loop never asks which strategy it runs.
"""

import dataclasses
import logging
import time
from typing import Any, Callable, Protocol

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from modeling.runtime import Runtime
from parallelism import disaggregation, rules as rules_lib
from parallelism.context import layout as context_layout
from training import data as data_lib
from training import step as step_lib
from training.hybrid import program as hybrid_program
from training.metrics import perf, telemetry, throughput
from training.composition import make_runtime
from training.state import ModelSetup, TrainState, init_train_state, setup_model

log = logging.getLogger('loomax')


class Program(Protocol):
  """The hooks every strategy's program provides (what `training/loop.py` calls)."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  setup: ModelSetup
  eval_step: Callable[[Any, dict], tuple[jax.Array, jax.Array]]

  def init_state(self) -> TrainState:
    ...

  def train_iterator(self, process_index: int, process_count: int):
    ...

  def prepare(self, host_batch) -> Any:
    ...

  def new_program(self, host_batch) -> bool:
    """Whether this batch is the first of a compiled program not run before (a new length
    stage): the loop times that step alone, as it does a run's first step."""
    ...

  def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    ...

  def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    ...

  def compiled_train_step(self):
    ...

  def throughput(self, peak: float) -> throughput.Throughput:
    ...

  def real_tokens(self, host_batch) -> int:
    ...

  def telemetry(self) -> telemetry.NoTelemetry:
    ...


@dataclasses.dataclass
class TrainProgram:
  """Static mesh: packed [batch_size, seq_len] rows, one jitted step."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  runtime: Runtime
  setup: ModelSetup
  batch_sharding: NamedSharding
  train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]  # jitted, donates state
  eval_step: Callable[[Any, dict], tuple[jax.Array, jax.Array]]     # jitted
  # Host-side rearrangement of each batch: zigzag under context parallelism; the identity
  # otherwise.
  host_layout: Callable[[dict], dict]

  def init_state(self) -> TrainState:
    return init_train_state(self.config, self.setup, self.runtime)

  # -- data -----------------------------------------------------------------------------------
  def train_iterator(self, process_index: int, process_count: int):
    """This process's host batches of packed rows."""
    return data_lib.make_train_iterator(self.config, process_index=process_index,
                                        process_count=process_count)

  def prepare(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """A host batch from `train_iterator` -> the train step's device batch."""
    return self.global_batch(host_batch)

  def new_program(self, host_batch) -> bool:
    del host_batch
    return False   # one program for every batch

  def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host-local rows -> one global array per key (each process passes only its rows),
    in the data layout of the run (zigzag under context parallelism)."""
    local_batch = self.host_layout(local_batch)
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The device batch's shapes (the pipeline's keys), for compiling the step without data."""
    shape = (self.config.batch_size, self.config.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=self.batch_sharding)
            for k in data_lib.batch_keys(self.config)}

  def compiled_train_step(self):
    """The train step compiled for this config's shapes (no execution needed)."""
    return self.train_step.compile(self.setup.abstract, self.abstract_batch())

  # -- measurement ----------------------------------------------------------------------------
  def throughput(self, peak: float) -> throughput.Throughput:
    """Timing windows: every step is batch_size x seq_len token positions (padding included)
    of `perf.train_flops_per_token` FLOPs each."""
    c = self.config
    return throughput.Throughput(c.batch_size * c.seq_len,
                                 perf.train_flops_per_token(c.model, c.seq_len), peak)

  def real_tokens(self, host_batch) -> int:
    """Non-padding tokens of the global step: counted on this process's rows; every process
    loads as many."""
    return throughput.real_tokens(host_batch) * jax.process_count()

  def telemetry(self) -> telemetry.Telemetry:
    return telemetry.Telemetry(self)


@dataclasses.dataclass
class DisaggregatedProgram(TrainProgram):
  """`parallelism.context_impl='disaggregated'`: the host plans each batch (DistCA), and the
  plan's 'dca_*' arrays join the device batch, which the step passes to the model."""
  planner: disaggregation.Planner | None = None

  def global_batch(self, local_batch):
    return super().global_batch(self.planner(local_batch))

  def abstract_batch(self):
    c = self.config
    plan = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
            for k, (shape, dtype) in self.planner.abstract(c.batch_size, c.seq_len).items()}
    return {**super().abstract_batch(), **plan}

  def telemetry(self) -> telemetry.Telemetry:
    return telemetry.DisaggregatedTelemetry(self)


class CompiledOnce:
  """A jitted step that a run compiles once: `compile(*abstract)` (telemetry's compiled
  figures, dry runs) keeps the executable and later calls run it, instead of the jit compiling
  the same program again on its first call. `lower` is the jitted function's."""

  def __init__(self, jitted):
    self.jitted, self.compiled = jitted, None
    self.compile_s = 0.0   # seconds `compile` took (the first step's compile, done ahead)

  def lower(self, *args):
    return self.jitted.lower(*args)

  def _cache_size(self) -> int:
    """Programs compiled so far (as jax's jitted functions count them)."""
    return self.jitted._cache_size() + (self.compiled is not None)

  def compile(self, *abstract):
    if self.compiled is None:
      t0 = time.perf_counter()
      self.compiled = self.jitted.lower(*abstract).compile()
      self.compile_s = time.perf_counter() - t0
    return self.compiled

  def __call__(self, *args):
    if self.compiled is None:
      return self.jitted(*args)
    try:
      return self.compiled(*args)
    except (TypeError, ValueError) as e:   # arguments laid out otherwise than the abstract ones
      log.warning('train step: the executable compiled ahead of time does not take these '
                  'arguments (%s); compiling for them', str(e).splitlines()[0][:200])
      self.compiled = None
      return self.jitted(*args)


def batch_sharding(config: ml_collections.ConfigDict, mesh: Mesh) -> NamedSharding:
  return rules_lib.named_sharding((config.batch_size, config.seq_len), ('batch', 'length'),
                                  config.parallelism.rules, mesh, 'batch')


def build_static(config: ml_collections.ConfigDict, mesh: Mesh) -> TrainProgram:
  """The static-mesh program (disaggregated attention included): runtime, sharded state
  layout and the jitted steps."""
  runtime = make_runtime(config, mesh)
  setup = setup_model(config, mesh, runtime)
  b_sharding = batch_sharding(config, mesh)
  constrain_micro = lambda x: jax.lax.with_sharding_constraint(x, b_sharding)
  train_step = CompiledOnce(jax.jit(
      step_lib.make_train_step(setup, config.optimizer.grad_accum_steps, constrain_micro,
                               config.attention.loss_chunk),
      in_shardings=(setup.shardings, b_sharding),
      out_shardings=(setup.shardings, rules_lib.replicated(mesh)), donate_argnums=0))
  eval_step = jax.jit(step_lib.make_eval_step(setup, config.attention.loss_chunk),
                      in_shardings=(setup.shardings.params, b_sharding))
  parts = (config, mesh, runtime, setup, b_sharding, train_step, eval_step,
           context_layout.host_layout(config, mesh))
  if config.parallelism.context_impl == 'disaggregated':
    return DisaggregatedProgram(*parts, planner=disaggregation.Planner(config, mesh))
  return TrainProgram(*parts)


def build_program(config: ml_collections.ConfigDict, mesh: Mesh) -> Program:
  """The program of the configured strategy (see the module docstring)."""
  static = build_static(config, mesh)
  if config.parallelism.hybrid_dp.enabled:
    return hybrid_program.HybridProgram(static)
  return static
