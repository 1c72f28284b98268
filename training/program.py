"""A config compiled onto a mesh: the runtime, shardings and jitted steps, built in one place
for the loop, the benchmarks and the tests."""

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from modeling.transformer import Runtime
from parallelism import disaggregation, rules as rules_lib
from parallelism.context import layout as context_layout
from training import step as step_lib
from training.composition import make_runtime
from training.state import ModelSetup, TrainState, init_train_state, setup_model


@dataclasses.dataclass
class TrainProgram:
  config: ml_collections.ConfigDict
  mesh: Mesh
  runtime: Runtime
  setup: ModelSetup
  batch_sharding: NamedSharding
  train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]  # jitted, donates state
  eval_step: Callable[[Any, dict], tuple[jax.Array, jax.Array]]     # jitted
  # Host-side rearrangement of each batch: zigzag under context parallelism, plus the
  # 'dca_*' task plan under disaggregated attention; the identity otherwise.
  host_layout: Callable[[dict], dict]

  def init_state(self) -> TrainState:
    return init_train_state(self.config, self.setup, self.runtime)

  def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host-local rows -> one global array per key (each process passes only its rows),
    in the data layout of the run (zigzag under context parallelism)."""
    local_batch = self.host_layout(local_batch)
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (self.config.batch_size, self.config.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=self.batch_sharding)
            for k in ('inputs', 'targets', 'segment_ids', 'positions')}

  def compiled_train_step(self):
    """The train step compiled for this config's shapes (no execution needed)."""
    return self.train_step.lower(self.setup.abstract, self.abstract_batch()).compile()


def batch_sharding(config: ml_collections.ConfigDict, mesh: Mesh) -> NamedSharding:
  return rules_lib.named_sharding((config.batch_size, config.seq_len), ('batch', 'length'),
                                  config.parallelism.rules, mesh, 'batch')


def build_program(config: ml_collections.ConfigDict, mesh: Mesh) -> TrainProgram:
  runtime = make_runtime(config, mesh)
  setup = setup_model(config, mesh, runtime)
  b_sharding = batch_sharding(config, mesh)
  constrain_micro = lambda x: jax.lax.with_sharding_constraint(x, b_sharding)
  train_step = jax.jit(
      step_lib.make_train_step(setup, config.optimizer.grad_accum_steps, constrain_micro,
                               config.attention.loss_chunk),
      in_shardings=(setup.shardings, b_sharding),
      out_shardings=(setup.shardings, rules_lib.replicated(mesh)), donate_argnums=0)
  eval_step = jax.jit(step_lib.make_eval_step(setup, config.attention.loss_chunk),
                      in_shardings=(setup.shardings.params, b_sharding))
  host_layout = disaggregation.with_plan(config, mesh,
                                         context_layout.host_layout(config, mesh))
  return TrainProgram(config, mesh, runtime, setup, b_sharding, train_step, eval_step,
                      host_layout)
