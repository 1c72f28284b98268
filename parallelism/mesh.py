"""The device mesh: axes (data, fsdp, context, tensor) sized from `config.mesh`."""

import math
from typing import Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ('data', 'fsdp', 'context', 'tensor')


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Resolves the one allowed -1 ("the rest") and checks the product against the devices."""
  sizes = {a: int(mesh_config[a]) for a in AXES}
  unknown = [a for a, s in sizes.items() if s == -1]
  bad = [f'mesh.{a}={s}' for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise ValueError(f'{", ".join(bad)}: mesh sizes must be positive or -1 (the rest)')
  if len(unknown) > 1:
    raise ValueError(f'only one mesh axis may be -1, got {", ".join("mesh." + a for a in unknown)}')
  known = math.prod(s for s in sizes.values() if s != -1)
  desc = ' x '.join(f'{a}={s}' for a, s in sizes.items() if s != 1 and s != -1) or 'all axes 1'
  if unknown:
    if num_devices % known:
      raise ValueError(f'mesh {desc} = {known} does not divide {num_devices} devices '
                       f'(mesh.{unknown[0]}=-1 takes the rest)')
    sizes[unknown[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(f'mesh {desc} = {known} does not match {num_devices} devices')
  return sizes


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: every device of every process), all axes Auto."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  if devices == list(jax.devices()):
    # Lets JAX order devices for the physical topology (ICI/NVLink rings) on real hardware.
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))
  return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def describe(mesh: Mesh) -> str:
  return ' x '.join(f'{a}={n}' for a, n in mesh.shape.items())
