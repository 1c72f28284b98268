"""Multi-process start-up through `jax.distributed`, JAX's own runtime.

One process per host (or, for tests, several processes on one machine with CPU
collectives). The coordinator address, process count and id come from
`config.distributed` or the environment (LOOMAX_COORDINATOR, LOOMAX_NUM_PROCESSES,
LOOMAX_PROCESS_ID).
"""

import os

import jax
import ml_collections


def settings(dist: ml_collections.ConfigDict) -> tuple[str, int, int]:
  coordinator = dist.coordinator or os.environ.get('LOOMAX_COORDINATOR', '')
  num = int(os.environ.get('LOOMAX_NUM_PROCESSES', dist.num_processes))
  pid = int(os.environ.get('LOOMAX_PROCESS_ID', dist.process_id))
  return coordinator, num, pid


def initialize(dist: ml_collections.ConfigDict) -> None:
  """Joins the process group when a coordinator is configured; a no-op otherwise."""
  coordinator, num, pid = settings(dist)
  if not coordinator:
    if num != 1:
      raise ValueError(f'distributed.num_processes={num} needs distributed.coordinator '
                       '(host:port) or LOOMAX_COORDINATOR')
    return
  if not 0 <= pid < num:
    raise ValueError(f'distributed.process_id={pid} must be in [0, {num})')
  if jax.distributed.is_initialized():
    return
  # Only the CPU backend reads this; it must be set before any backend starts.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid,
                             initialization_timeout=int(dist.init_timeout_s),
                             heartbeat_timeout_seconds=int(dist.heartbeat_timeout_s))
