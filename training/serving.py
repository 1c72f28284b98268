"""A trained run's parameters on the local devices, for evaluation and sampling.

Reads the run's config.json, replaces its mesh and parallel strategy by the local one (any
device count: parameters are restored universally, checkpoint/universal.py), and reads only the
parameters (no optimizer state), so a `--params-only` checkpoint serves as well.
"""

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from checkpoint import metadata, universal
from checkpoint.manager import Checkpointer
from modeling import registry
from modeling.transformer import Runtime
from parallelism import mesh as mesh_lib
from training.composition import make_runtime
from training.state import ModelSetup, setup_model

_PARAMS = 'params' + metadata.SEP


@dataclasses.dataclass
class LoadedRun:
  config: ml_collections.ConfigDict   # the run's config with the local mesh and strategy
  mesh: Mesh
  setup: ModelSetup
  params: Any                         # nested dict of arrays, sharded for `mesh`
  step: int
  workdir: str

  def model(self, runtime=None) -> nnx.Module:
    """The model with these parameters; `runtime` None = plain single-device attention."""
    runtime = runtime or Runtime()
    abstract = nnx.eval_shape(lambda: registry.build_model(self.config.model, rngs=nnx.Rngs(0),
                                                           runtime=runtime))
    graphdef = nnx.split(abstract)[0]
    return nnx.merge(graphdef, self.params)


def run_dir(checkpoint: str) -> str:
  """The run's workdir from --checkpoint (the workdir or its checkpoints/ folder)."""
  workdir = os.path.abspath(checkpoint)
  if not os.path.exists(os.path.join(workdir, 'config.json')):
    workdir = os.path.dirname(workdir)
  if not os.path.exists(os.path.join(workdir, 'config.json')):
    raise FileNotFoundError(f'--checkpoint={checkpoint!r}: no config.json in it or its parent')
  return workdir


def read_config(workdir: str) -> ml_collections.ConfigDict:
  with open(os.path.join(workdir, 'config.json')) as f:
    return ml_collections.ConfigDict(json.load(f))


def local_config(config: ml_collections.ConfigDict, *, context: int = 1, devices=None,
                 attention: str | None = None) -> ml_collections.ConfigDict:
  """`config` on this machine's devices: data parallel over all of them, or `context`-way
  ring attention (zigzag) when context > 1; `attention` overrides attention.impl."""
  c = ml_collections.ConfigDict(config.to_dict())
  n = len(devices) if devices is not None else jax.device_count()
  if context < 1 or n % context:
    raise ValueError(f'--context={context} must divide the {n} local devices')
  c.mesh.update(data=n // context, fsdp=1, context=context, tensor=1)
  c.parallelism.context_impl = 'ring' if context > 1 else 'none'
  c.parallelism.hybrid_dp.enabled = False
  if attention:
    c.attention.impl = attention
  c.optimizer.grad_accum_steps = 1
  return c


def load(checkpoint: str, step: int | None = None, *, context: int = 1, devices=None,
         attention: str | None = None) -> LoadedRun:
  workdir = run_dir(checkpoint)
  config = local_config(read_config(workdir), context=context, devices=devices,
                        attention=attention)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  setup = setup_model(config, mesh, make_runtime(config, mesh))
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'--checkpoint={checkpoint!r} holds no checkpoint')
    arrays, _ = universal.restore_params(ckpt, step, config, setup, mesh)
  finally:
    ckpt.close()
  params = metadata.unflatten_like({p[len(_PARAMS):]: a for p, a in arrays.items()},
                                   setup.abstract.params)
  return LoadedRun(config, mesh, setup, params, step, workdir)
