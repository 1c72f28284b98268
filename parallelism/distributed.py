"""Multi-process start-up through `jax.distributed`, JAX's own runtime.

One process per host (or, for tests, several processes on one machine with CPU collectives).
Where the process group comes from, first match wins:

  1. explicit: `distributed.coordinator=host:port` (or env LOOMAX_COORDINATOR) with
     `distributed.num_processes` / `distributed.process_id` (or LOOMAX_NUM_PROCESSES /
     LOOMAX_PROCESS_ID);
  2. `distributed.coordinator='auto'`, or nothing set while a cluster launcher is detected
     (`detect_cluster`: a SLURM step, Open MPI, a Kubernetes Indexed Job, a Cloud TPU pod):
     `jax.distributed.initialize()` reads the launcher's environment itself. Whatever of
     num_processes / process_id is set explicitly still wins;
  3. otherwise a single process.

docs/clusters.md has launcher recipes and says how the coordinator port is chosen.
"""

import dataclasses
import importlib.util
import logging
import os

import jax
import ml_collections

log = logging.getLogger('loomax')

AUTO = 'auto'


@dataclasses.dataclass(frozen=True)
class Settings:
  mode: str                    # 'single' | 'explicit' | 'auto'
  coordinator: str | None      # host:port, None: from the cluster environment
  num_processes: int | None    # None: from the cluster environment
  process_id: int | None
  cluster: str                 # the detected launcher ('' if none)


def _int_env(name: str) -> int | None:
  value = os.environ.get(name, '').strip()
  if not value:
    return None
  if not value.lstrip('-').isdigit():
    raise ValueError(f'environment variable {name}={value!r} is not an integer')
  return int(value)


def _count(name: str) -> int:
  value = os.environ.get(name, '')
  return int(value) if value.isdigit() else 0


def detect_cluster() -> str:
  """The multi-process launcher that started this process, by the environment it sets ('' when
  none, or when it started a single process). Mirrors the environments
  jax.distributed.initialize() can read."""
  env = os.environ
  # JAX's SlurmCluster needs these (SLURM_STEP_NODELIST exists only inside an srun step).
  if all(k in env for k in ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS',
                            'SLURM_PROCID', 'SLURM_LOCALID')) and _count('SLURM_NTASKS') > 1:
    return 'slurm'
  if 'OMPI_MCA_orte_hnp_uri' in env and _count('OMPI_COMM_WORLD_SIZE') > 1:
    return 'ompi'
  # A pod of an Indexed Job / JobSet; JAX asks the Kubernetes API for its peers, which needs
  # the `kubernetes` package (pip install jax[k8s]) and pod-list permission.
  if ('KUBERNETES_SERVICE_HOST' in env and 'JOB_COMPLETION_INDEX' in env
      and importlib.util.find_spec('kubernetes') is not None):
    return 'kubernetes'
  hosts = env.get('TPU_WORKER_HOSTNAMES') or env.get('TPU_PROCESS_ADDRESSES') or ''
  if len([h for h in hosts.split(',') if h.strip()]) > 1:
    return 'tpu'
  return ''


def settings(dist: ml_collections.ConfigDict) -> Settings:
  coordinator = (dist.coordinator or os.environ.get('LOOMAX_COORDINATOR', '')).strip()
  num = _int_env('LOOMAX_NUM_PROCESSES')
  num = num if num is not None else (dist.num_processes if dist.num_processes > 0 else None)
  pid = _int_env('LOOMAX_PROCESS_ID')
  pid = pid if pid is not None else (dist.process_id if dist.process_id >= 0 else None)
  cluster = detect_cluster()
  if coordinator and coordinator != AUTO:
    if ':' not in coordinator:
      raise ValueError(f"distributed.coordinator={coordinator!r}: give host:port, or 'auto'")
    if num is None or pid is None:
      raise ValueError(f'distributed.coordinator={coordinator!r} needs '
                       'distributed.num_processes and distributed.process_id (or '
                       'LOOMAX_NUM_PROCESSES / LOOMAX_PROCESS_ID)')
    if not 0 <= pid < num:
      raise ValueError(f'distributed.process_id={pid} must be in [0, {num})')
    return Settings('explicit', coordinator, num, pid, cluster)
  if coordinator == AUTO or cluster:
    if num is not None and pid is not None and not 0 <= pid < num:
      raise ValueError(f'distributed.process_id={pid} must be in [0, {num})')
    return Settings('auto', None, num, pid, cluster)
  if num not in (None, 1) or pid not in (None, 0):
    raise ValueError(f'distributed.num_processes={num} / process_id={pid} need '
                     "distributed.coordinator (host:port or 'auto') or LOOMAX_COORDINATOR")
  return Settings('single', None, 1, 0, '')


def local_device_ids(dist: ml_collections.ConfigDict) -> list[int] | None:
  """'all': each process uses every accelerator of its host (one process per host; [] tells
  JAX not to restrict). 'auto': JAX's rule (one device per process, by local rank).
  '0,1': those devices."""
  value = str(dist.get('local_device_ids', 'all')).strip()
  if value == 'all':
    return []
  if value == AUTO:
    return None
  try:
    return [int(x) for x in value.split(',') if x.strip()]
  except ValueError:
    raise ValueError(f"distributed.local_device_ids={value!r}: 'all', 'auto' or a "
                     'comma-separated list of device ids') from None


def initialize(dist: ml_collections.ConfigDict) -> Settings:
  """Joins the process group (see the module docstring); a no-op for a single process."""
  s = settings(dist)
  if s.mode == 'single' or jax.distributed.is_initialized():
    return s
  devices = local_device_ids(dist)
  port = int(dist.get('coordinator_port', 0))
  if s.mode == 'auto' and port:
    os.environ['JAX_COORDINATOR_PORT'] = str(port)  # the only way to pass it to JAX's detection
  # Only the CPU backend reads this; it must be set before any backend starts.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  log.info('joining the process group: %s%s', s.mode,
           f' ({s.cluster} detected)' if s.cluster else '')
  try:
    jax.distributed.initialize(coordinator_address=s.coordinator, num_processes=s.num_processes,
                               process_id=s.process_id, local_device_ids=devices,
                               initialization_timeout=int(dist.init_timeout_s),
                               heartbeat_timeout_seconds=int(dist.heartbeat_timeout_s))
  except ValueError as e:
    if s.mode == 'auto':
      raise ValueError(f"distributed.coordinator='auto' but JAX found no cluster environment "
                       f'to read ({e}); set distributed.coordinator=host:port, '
                       'num_processes and process_id instead') from e
    raise
  return s
