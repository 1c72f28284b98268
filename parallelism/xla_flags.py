"""XLA flags the parallel strategies need to overlap communication with compute on GPU.

`parallelism.xla_flags` (config) says which flags `apply` adds to `XLA_FLAGS` at start-up
(`train.py`, `scripts/bench_gpu.py`), before any backend exists:
  auto   the overlap flags below where a CUDA plugin for jax is installed (else nothing: a CPU
         run's XLA_FLAGS stay as they were)
  none   nothing
  other  that string of flags instead of auto's
A flag already in the environment's XLA_FLAGS (by name) wins, so `XLA_FLAGS=... python
train.py` overrides any of them. What each flag is for: docs/performance.md ("GPU flags").
"""

import importlib.util
import logging
import os

log = logging.getLogger('loomax')

GPU_OVERLAP = (
    # Schedules async collectives (collective-permute-start/done) around independent compute:
    # without it the ring's double buffering and dK/dV lag buy nothing.
    '--xla_gpu_enable_latency_hiding_scheduler=true',
    # TokenRing sends queries one way and results the other in the same step: two
    # collectives in flight at once (the default keeps one).
    '--xla_gpu_experimental_parallel_collective_overlap_limit=2',
)


def _name(flag: str) -> str:
  return flag.split('=', 1)[0]


def gpu_plugin_installed() -> bool:
  return any(importlib.util.find_spec(name) is not None
             for name in ('jax_cuda12_plugin', 'jax_cuda13_plugin'))


def flags_for(setting: str, gpu: bool = True) -> tuple[str, ...]:
  if setting == 'auto':
    return GPU_OVERLAP if gpu else ()
  if setting in ('none', ''):
    return ()
  return tuple(setting.split())


def merged(setting: str, current: str, gpu: bool = True) -> str:
  """XLA_FLAGS with the setting's flags added, the ones already in `current` kept as they are."""
  have = {_name(f) for f in current.split()}
  extra = [f for f in flags_for(setting, gpu) if _name(f) not in have]
  return ' '.join([current.strip(), *extra]).strip()


def apply(config, environ=None) -> str:
  """Adds `config.parallelism.xla_flags` to XLA_FLAGS; returns the new value. Call before
  anything asks jax for a device (XLA reads the flags once, when the backend starts)."""
  environ = os.environ if environ is None else environ
  setting = config.parallelism.xla_flags
  value = merged(setting, environ.get('XLA_FLAGS', ''), gpu_plugin_installed())
  if value != environ.get('XLA_FLAGS', ''):
    from jax._src import xla_bridge  # no public query; only to warn when it is too late
    if xla_bridge.backends_are_initialized():
      log.warning('parallelism.xla_flags: the backend already started; %s not applied', value)
      return environ.get('XLA_FLAGS', '')
    environ['XLA_FLAGS'] = value
  return value
