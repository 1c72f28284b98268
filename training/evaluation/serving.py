"""A trained run's parameters on the local devices, for evaluation and sampling.

Reads the config the chosen step was saved with (its metadata; a WARNING names any key where
the workdir's config.json, the latest run's, differs), replaces its mesh and parallel strategy
by the local one (any device count: parameters are restored universally,
checkpoint/universal.py), and reads only the parameters (no optimizer state), so a
`--params-only` checkpoint serves as well.
"""

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from checkpoint import metadata, universal
from checkpoint.errors import UserError
from checkpoint.manager import Checkpointer
from modeling import registry
from modeling.transformer import Runtime
from parallelism import mesh as mesh_lib
from training.composition import make_runtime
from training.state import ModelSetup, setup_model

_PARAMS = 'params' + metadata.SEP
log = logging.getLogger('loomax')


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
  for candidate in (workdir, os.path.dirname(workdir)):
    if os.path.isdir(os.path.join(candidate, 'checkpoints')) or \
        os.path.exists(os.path.join(candidate, 'config.json')):
      return candidate
  raise UserError(f'--checkpoint={checkpoint!r}: no checkpoints/ folder or config.json in it '
                  'or its parent (give a run workdir)')


def read_config(workdir: str) -> ml_collections.ConfigDict:
  with open(os.path.join(workdir, 'config.json')) as f:
    return ml_collections.ConfigDict(json.load(f))


# Keys that say how a run trains, logs or saves, not what model a step holds.
_RUN_KEYS = ('steps', 'resume', 'resume_step', 'init_from', 'progress', 'log_every', 'eval_every',
             'eval_batches', 'eval.', 'checkpoint.', 'profile_', 'perf.', 'distributed.',
             'dry_run', 'optimizer.decay_steps')


def step_config(ckpt: Checkpointer, step: int, workdir: str) -> ml_collections.ConfigDict:
  """The resolved config step `step` was saved with (its own metadata), with a WARNING naming
  the keys where the workdir's config.json (the latest run's) says otherwise."""
  saved = ckpt.read_meta(step)['config']
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    try:
      with open(path) as f:
        latest = ml_collections.ConfigDict(json.load(f))
    except (OSError, ValueError):
      latest = None
    if latest is not None:
      changed = {k: v for k, v in universal.config_changes(saved, latest).items()
                 if not k.startswith(_RUN_KEYS)}
      if changed:
        log.warning('step %d was trained with another config than %s: using the step\'s own '
                    '(%s)', step, path, '; '.join(f'{k}: {a!r} in the step, {b!r} in '
                                                  'config.json' for k, (a, b) in changed.items()))
  return ml_collections.ConfigDict(saved)


def pick_step(ckpt: Checkpointer, step: int | None, checkpoint: str) -> int:
  """`step`, or the newest; a UserError listing the steps that exist otherwise."""
  steps = sorted(ckpt.all_steps())
  if not steps:
    raise UserError(f'--checkpoint={checkpoint!r} holds no checkpoint ({ckpt.directory})')
  if step is None:
    return steps[-1]
  if step not in steps:
    raise UserError(f'--step {step}: no such checkpoint in {ckpt.directory}; steps: '
                    f'{", ".join(map(str, steps))}')
  return step


def local_config(config: ml_collections.ConfigDict, *, context: int = 1, devices=None,
                 attention: str | None = None) -> ml_collections.ConfigDict:
  """`config` on this machine's devices: data parallel over all of them, or `context`-way
  ring attention (zigzag) when context > 1; `attention` overrides attention.impl."""
  c = ml_collections.ConfigDict(config.to_dict())
  n = len(devices) if devices is not None else jax.device_count()
  if context < 1 or n % context:
    raise UserError(f'--context={context} must divide the {n} local devices')
  c.mesh.update(data=n // context, fsdp=1, context=context, tensor=1)
  c.parallelism.context_impl = 'ring' if context > 1 else 'none'
  c.parallelism.hybrid_dp.enabled = False
  if attention:
    c.attention.impl = attention
  c.optimizer.grad_accum_steps = 1
  return c


def load(checkpoint: str, step: int | None = None, *, context: int = 1, devices=None,
         attention: str | None = None) -> LoadedRun:
  """Step `step` (default: the newest) of a run, with the config that step was saved with."""
  workdir = run_dir(checkpoint)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  try:
    step = pick_step(ckpt, step, checkpoint)
    config = local_config(step_config(ckpt, step, workdir), context=context, devices=devices,
                          attention=attention)
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    setup = setup_model(config, mesh, make_runtime(config, mesh))
    arrays, _ = universal.restore_params(ckpt, step, config, setup, mesh)
  finally:
    ckpt.close()
  params = metadata.unflatten_like({p[len(_PARAMS):]: a for p, a in arrays.items()},
                                   setup.abstract.params)
  return LoadedRun(config, mesh, setup, params, step, workdir)
