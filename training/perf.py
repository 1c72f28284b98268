"""Model FLOPs, measured matmul peak and MFU, counted as ../shared/MEASURING.md says."""

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from modeling import registry


def train_flops_per_token(model_config: ml_collections.ConfigDict, seq_len: int,
                          causal: bool = True) -> float:
  """3 x forward (forward + 2 x backward); remat recomputation is not counted."""
  fam = registry.get_family(model_config.name)
  return 3.0 * fam.forward_flops_per_token(model_config, seq_len, causal=causal)


def measure_peak_flops(mesh: Mesh, dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
  """Aggregate FLOP/s of the mesh's devices each running an n x n matmul at once.

  Measured over all devices together because fake CPU devices share the same cores:
  a per-device figure times the device count would overstate the machine.
  """
  devices = mesh.devices.reshape(-1)
  flat = Mesh(devices, ('d',))
  sharding = NamedSharding(flat, P('d'))
  x = jax.device_put(jnp.ones((len(devices), n, n), dtype) / n, sharding)
  f = jax.jit(lambda a: jnp.einsum('dij,djk->dik', a, a), out_shardings=sharding)
  f(x).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2.0 * n ** 3 * len(devices) / float(np.min(times))


def device_memory_bytes() -> int | None:
  """Peak bytes in use on the first local device, where the backend reports it."""
  stats = jax.local_devices()[0].memory_stats()
  if not stats:
    return None
  return int(stats.get('peak_bytes_in_use', stats.get('bytes_in_use', 0)))


def compiled_memory_bytes(compiled) -> int:
  """Per-device bytes of a compiled program: temp + arguments + outputs - aliased."""
  m = compiled.memory_analysis()
  return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
             - m.alias_size_in_bytes)
