"""The train state and its birth: parameters and optimizer state created already sharded."""

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from modeling import registry
from modeling.runtime import Runtime
from parallelism import rules as rules_lib
from training import optimizer as optimizer_lib


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array        # int32 scalar: optimizer steps taken
  params: Any            # nested dict of arrays (the model's nnx.Param values)
  opt_state: Any
  rng: jax.Array         # uint32[2]; step t uses fold_in(rng, t)


@dataclasses.dataclass(frozen=True)
class ModelSetup:
  """Everything static about a run's model: how to rebuild it, its axes, its optimizer."""
  graphdef: Any
  param_axes: Any        # nested dict of logical-axis tuples, same structure as params
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  shardings: TrainState  # NamedSharding per leaf
  abstract: TrainState   # ShapeDtypeStruct per leaf (with shardings)
  skip_nonfinite: bool = False  # optimizer.skip_nonfinite: a non-finite update leaves the state


def _split_params(model: nnx.Module):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise TypeError('models must hold only nnx.Param state (found other variables)')
  return graphdef, params


def param_axes_of(abstract_params_state) -> Any:
  specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params_state))
  return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def setup_model(config: ml_collections.ConfigDict, mesh: Mesh, runtime: Runtime) -> ModelSetup:
  """Traces the model abstractly (no memory) and derives every sharding from the rules."""
  abstract_model = nnx.eval_shape(
      lambda: registry.build_model(config.model, rngs=nnx.Rngs(0), runtime=runtime))
  graphdef, abstract_params_state = _split_params(abstract_model)
  param_axes = param_axes_of(abstract_params_state)
  abstract_params = nnx.to_pure_dict(abstract_params_state)
  rules = config.parallelism.rules
  param_shardings = rules_lib.tree_shardings(abstract_params, param_axes, rules, mesh)
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, config.steps, param_axes)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = rules_lib.replicated(mesh)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_shardings,
      transform_non_params=lambda _: replicated, is_leaf=lambda x: x is None)
  shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                         rng=replicated)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                        opt_state=abstract_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return ModelSetup(graphdef, param_axes, tx, schedule, shardings, abstract,
                    bool(config.optimizer.skip_nonfinite))


def init_train_state(config: ml_collections.ConfigDict, setup: ModelSetup,
                     runtime: Runtime) -> TrainState:
  """Initialises under jit with out_shardings, so no device ever holds the whole model."""

  def init(seed):
    key = jax.random.PRNGKey(seed)
    model = registry.build_model(config.model, rngs=nnx.Rngs(params=key), runtime=runtime)
    params = nnx.to_pure_dict(_split_params(model)[1])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=setup.tx.init(params), rng=jax.random.fold_in(key, 1))

  return jax.jit(init, out_shardings=setup.shardings)(config.seed)


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))
