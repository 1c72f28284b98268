"""Config values checked before anything runs: every key with a valid range (configs/base.py
states each range beside its key), so a bad value is a one-line UserError naming the key, never
a ZeroDivisionError after minutes of compiling.

`validate` needs no devices; `validate_on_devices` adds what depends on the device count (mesh
sizes, batch rows per device). Both raise checkpoint.errors.UserError.
"""

import math
from typing import Any, Callable

import ml_collections

from checkpoint.errors import UserError

_MISSING = object()

# (key, test, what the valid range is). A key a config does not have is skipped.
_RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    ('steps', lambda v: v >= 1, '>= 1'),
    ('batch_size', lambda v: v >= 1, '>= 1'),
    ('seq_len', lambda v: v >= 1, '>= 1'),
    ('log_every', lambda v: v >= 1, '>= 1'),
    ('eval_every', lambda v: v >= -1, '>= -1 (0 = only at the end, -1 = off)'),
    ('eval_batches', lambda v: v >= 0, '>= 0 (0 = eval off)'),
    ('resume_step', lambda v: v >= -1, '>= -1 (-1 = the newest step)'),
    ('profile_steps', lambda v: v >= 0, '>= 0'),
    ('profile_start', lambda v: v >= 0, '>= 0'),
    ('model.num_layers', lambda v: v >= 1, '>= 1'),
    ('model.d_model', lambda v: v >= 1, '>= 1'),
    ('model.num_heads', lambda v: v >= 1, '>= 1'),
    ('model.num_kv_heads', lambda v: v >= 1, '>= 1'),
    ('model.head_dim', lambda v: v >= 1, '>= 1'),
    ('model.mlp_dim', lambda v: v >= 1, '>= 1'),
    ('model.vocab_size', lambda v: v >= 1, '>= 1'),
    ('model.rope_theta', lambda v: v >= 0, '>= 0 (0 = no rotary embeddings)'),
    ('model.norm_eps', lambda v: v > 0, '> 0'),
    ('model.init_std', lambda v: v > 0, '> 0'),
    ('model.sliding_window', lambda v: v >= 0, '>= 0 (0 = off)'),
    ('model.kv_routing.p', lambda v: 0 < v <= 1, 'in (0, 1]'),
    ('attention.block_q', lambda v: v >= 1, '>= 1'),
    ('attention.block_kv', lambda v: v >= 1, '>= 1'),
    ('attention.loss_chunk', lambda v: v >= -1, '>= -1 (-1 = auto, 0 = whole sequence)'),
    ('data.eval_fraction', lambda v: 0 <= v < 1, 'in [0, 1)'),
    ('data.num_packing_bins', lambda v: v >= 1, '>= 1'),
    ('data.shuffle_window', lambda v: v >= 0, '>= 0 (0 = off)'),
    ('data.read_threads', lambda v: v >= 0, '>= 0'),
    ('data.read_prefetch', lambda v: v >= 0, '>= 0'),
    ('data.worker_count', lambda v: v >= 0, '>= 0 (0 = in-process)'),
    ('data.task_length', lambda v: v >= 0, '>= 0 (0 = seq_len)'),
    ('optimizer.lr', lambda v: v >= 0, '>= 0'),
    ('optimizer.warmup_steps', lambda v: v >= 0, '>= 0'),
    ('optimizer.decay_steps', lambda v: v >= 0, '>= 0 (0 = steps)'),
    ('optimizer.min_lr_ratio', lambda v: 0 <= v <= 1, 'in [0, 1]'),
    ('optimizer.decay_fraction', lambda v: 0 <= v <= 1, 'in [0, 1]'),
    ('optimizer.b1', lambda v: 0 <= v < 1, 'in [0, 1)'),
    ('optimizer.b2', lambda v: 0 <= v < 1, 'in [0, 1)'),
    ('optimizer.eps', lambda v: v > 0, '> 0'),
    ('optimizer.weight_decay', lambda v: v >= 0, '>= 0'),
    ('optimizer.clip_norm', lambda v: v >= 0, '>= 0 (0 = off)'),
    ('optimizer.grad_accum_steps', lambda v: v >= 1, '>= 1'),
    ('checkpoint.every', lambda v: v >= 0, '>= 0 (0 = only at the end)'),
    ('checkpoint.keep', lambda v: v >= 1, '>= 1'),
    ('checkpoint.keep_every', lambda v: v >= 0, '>= 0 (0 = off)'),
    ('perf.peak_flops', lambda v: v >= 0, '>= 0 (0 = measure)'),
    ('perf.peak_trials', lambda v: v >= 1, '>= 1'),
    ('distributed.init_timeout_s', lambda v: v > 0, '> 0'),
    ('distributed.heartbeat_timeout_s', lambda v: v > 0, '> 0'),
]


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node: Any = config
  for part in key.split('.'):
    if not hasattr(node, 'get') or part not in node:
      return _MISSING
    node = node[part]
  return node


def _ok(test, value) -> bool:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return False
  if isinstance(value, float) and math.isnan(value):
    return False
  return bool(test(value))


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for the first key outside its valid range (no devices needed)."""
  for key, test, valid in _RANGES:
    value = _get(config, key)
    if value is _MISSING or value is None:
      continue
    if not _ok(test, value):
      raise UserError(f'{key}={value!r} is out of range: must be {valid} (configs/base.py)')
  m = config.model
  if m.num_heads % m.num_kv_heads:
    raise UserError(f'model.num_kv_heads={m.num_kv_heads} must divide '
                    f'model.num_heads={m.num_heads}')
  task_length = _get(config, 'data.task_length')
  if task_length is not _MISSING and task_length > config.seq_len:
    raise UserError(f'data.task_length={task_length} must be at most seq_len={config.seq_len} '
                    '(0 means seq_len)')
  accum = config.optimizer.get('grad_accum_steps', 1)
  if config.batch_size % accum and not _hybrid(config):
    raise UserError(f'batch_size={config.batch_size} is not divisible by '
                    f'optimizer.grad_accum_steps={accum}')


def _hybrid(config) -> bool:
  return bool(_get(config, 'parallelism.hybrid_dp.enabled') is True)


def validate_on_devices(config: ml_collections.ConfigDict, num_devices: int,
                        process_count: int = 1) -> dict[str, int]:
  """The mesh shape for `num_devices`; raises UserError when the mesh does not fit them or the
  batch does not split over the batch axes (data x fsdp) and the processes."""
  from parallelism import mesh as mesh_lib
  try:
    shape = mesh_lib.mesh_shape(config.mesh, num_devices)
  except ValueError as e:  # a pure check of mesh.* against the device count
    raise UserError(str(e)) from e
  if _hybrid(config):
    return shape
  rows = shape.get('data', 1) * shape.get('fsdp', 1)
  if config.batch_size % rows:
    raise UserError(f'batch_size={config.batch_size} is not divisible by mesh data x fsdp = '
                    f'{rows} ({num_devices} devices split the batch rows)',
                    hint='choose a batch_size that is a multiple of it, or set mesh.data')
  if config.batch_size % process_count:
    raise UserError(f'batch_size={config.batch_size} is not divisible by the process count '
                    f'{process_count}')
  return shape
