"""Model FLOPs, measured matmul peak and MFU, counted as docs/measuring.md says."""

import math
import re
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


def measure_peak_trials(mesh: Mesh, dtype=jnp.float32, n: int = 2048,
                        trials: int = 10) -> list[float]:
  """Aggregate FLOP/s of the mesh's devices each running an n x n matmul at once, one figure
  per trial (after a compile-and-warm-up call).

  Measured over all devices together because fake CPU devices share the same cores:
  a per-device figure times the device count would overstate the machine.
  """
  devices = mesh.devices.reshape(-1)
  flat = Mesh(devices, ('d',))
  sharding = NamedSharding(flat, P('d'))
  x = jax.device_put(jnp.ones((len(devices), n, n), dtype) / n, sharding)
  f = jax.jit(lambda a: jnp.einsum('dij,djk->dik', a, a), out_shardings=sharding)
  f(x).block_until_ready()
  flops = 2.0 * n ** 3 * len(devices)
  out = []
  for _ in range(trials):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    out.append(flops / (time.perf_counter() - t0))
  return out


def measure_peak_flops(mesh: Mesh, dtype=jnp.float32, n: int = 2048, trials: int = 10) -> float:
  """The best of `trials` matmul timings: a busy machine only ever slows a trial down, so the
  fastest one is the closest to what the devices can do."""
  return max(measure_peak_trials(mesh, dtype, n, trials))


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


_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
                'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8}
_INSTR = re.compile(r'=\s*(.*?)\s(' + '|'.join(_COLLECTIVES) + r')(-start)?\((.*)$')
_SHAPE = re.compile(r'\b(' + '|'.join(_DTYPE_BYTES) + r')\[([\d,]*)\]')
_GROUPS_LIST = re.compile(r'replica_groups=\{\{([\d,]*)\}')
_GROUPS_IOTA = re.compile(r'replica_groups=\[(\d+),(\d+)\]')
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\].*?\}?\s*\{([^}]*)\}")


def _shapes_bytes(text: str) -> list[int]:
  return [_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
          for dtype, dims in _SHAPE.findall(text)]


def _group_size(attrs: str, num_devices: int) -> int:
  if m := _GROUPS_MESH.search(attrs):
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)))
  if m := _GROUPS_LIST.search(attrs):
    return len(m.group(1).split(','))
  if m := _GROUPS_IOTA.search(attrs):
    return int(m.group(2))
  return num_devices


def collective_bytes(hlo_text: str, num_devices: int) -> dict[str, float]:
  """Bytes each device sends per step, by collective kind, from optimized HLO text.

  From each collective's per-device result of R bytes in a group of N devices, counted as a
  bandwidth-optimal ring moves them: all-reduce 2(N-1)/N R, all-gather and all-to-all
  (N-1)/N R, reduce-scatter (N-1) R (its input is N R), collective-permute R.
  """
  out = {k: 0.0 for k in _COLLECTIVES}
  for line in hlo_text.splitlines():
    m = _INSTR.search(line)
    if not m:
      continue
    result_type, kind, is_async, attrs = m.groups()
    sizes = _shapes_bytes(result_type)
    if not sizes:
      continue
    # An async start returns (operand, output, ...): the largest buffer is the output.
    r = max(sizes) if is_async else sum(sizes)
    n = _group_size(attrs, num_devices)
    if n <= 1:
      continue
    factor = {'all-reduce': 2 * (n - 1) / n, 'all-gather': (n - 1) / n,
              'reduce-scatter': n - 1, 'all-to-all': (n - 1) / n, 'collective-permute': 1.0}[kind]
    out[kind] += factor * r
  out['total'] = sum(out.values())
  return out


def time_call(fn, repeats: int = 5) -> dict[str, float]:
  """Median/min/max seconds of `fn()` (which must block), after one warm-up call."""
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return {'median': float(np.median(times)), 'min': float(np.min(times)),
          'max': float(np.max(times))}


# --------------------------------------------------------------- trip-count-aware collectives
# Moved here from scripts/bench_context.py so the benchmarks and the training telemetry count
# communication one way. Unlike `collective_bytes`, ops inside while loops count once per
# iteration (their known trip count), ops inside an N-way conditional 1/N each, and
# collective-permute is charged to each (source, target) pair's source device.

_HLO_SHAPE = re.compile(r'\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([0-9,]*)\]')


def _type_bytes(type_text: str) -> int:
  return sum(_DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(',') if d] or [1]))
             for dtype, dims in _HLO_SHAPE.findall(type_text))


def _hlo_computations(hlo: str) -> dict[str, list[str]]:
  comps, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r'^(ENTRY )?%?([\w.\-]+) .*\{$', line)
    if head and not line.startswith(' '):
      name = 'ENTRY' if head.group(1) else head.group(2)
      comps[name] = []
    elif name is not None and line.startswith('  '):
      comps[name].append(line)
  return comps


def collective_bytes_by_kind(hlo: str, num_devices: int) -> dict[str, np.ndarray]:
  """Bytes each device sends in one execution of the program, per collective kind
  ('collective-permute', 'all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all'), as
  float64 [num_devices] arrays: collective-permute operand bytes per (source, target) pair,
  all-gather output x (N - 1) / N, reduce-scatter output x (N - 1), all-reduce
  2 (N - 1) / N x buffer, all-to-all (N - 1) / N x buffer, for groups of N devices."""
  comps = _hlo_computations(hlo)
  sent = {k: np.zeros(num_devices) for k in _COLLECTIVES}

  def visit(name: str, weight: float):
    for line in comps.get(name, []):
      line = re.sub(r', metadata=\{.*?\}(?=, |$)', '', line)
      m = re.match(r'\s*(?:ROOT )?%[\w.\-]+ = (.*?) ([\w\-]+)\(', line)
      if not m:
        continue
      result_type, op = m.groups()
      if op == 'while':
        body = re.search(r'body=%?([\w.\-]+)', line).group(1)
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
        if trip is None:
          raise ValueError(f'while loop without a known trip count: {line[:200]}')
        visit(body, weight * int(trip.group(1)))
      elif op == 'conditional':
        branches = re.search(r'branch_computations=\{([^}]*)\}', line)
        names = ([b.strip().lstrip('%') for b in branches.group(1).split(',')] if branches else
                 [re.search(f'{k}=%?([\\w.\\-]+)', line).group(1)
                  for k in ('true_computation', 'false_computation')])
        for b in names:
          visit(b, weight / len(names))
      elif op in ('call', 'fusion'):
        called = re.search(r'(?:to_apply|calls)=%?([\w.\-]+)', line)
        if called:
          visit(called.group(1), weight)
      base_op = op.removesuffix('-start')
      if base_op not in _COLLECTIVES:
        continue
      size = _type_bytes(result_type)
      if op.endswith('-start') and base_op != 'all-reduce':
        size = _type_bytes(result_type) // 2  # start ops return (operand, result) tuples
      if base_op == 'collective-permute':
        for src, _ in re.findall(r'\{(\d+),(\d+)\}', re.search(
            r'source_target_pairs=\{(.*?)\}\}', line).group(0)):
          sent[base_op][int(src)] += weight * size
        continue
      groups = re.search(r'replica_groups=\{\{([\d,]*)\}', line)
      group = len(groups.group(1).split(',')) if groups else num_devices
      iota = re.search(r'replica_groups=\[\d+,(\d+)\]', line)
      group = int(iota.group(1)) if iota else group
      if base_op == 'all-gather':
        per = size / group * (group - 1)
      elif base_op == 'reduce-scatter':
        per = size * (group - 1)
      elif base_op == 'all-reduce':
        per = 2 * (group - 1) / group * size
      else:
        per = size * (group - 1) / group
      sent[base_op][:] += weight * per

  visit('ENTRY', 1.0)
  return sent


def collective_bytes_per_device(hlo: str, num_devices: int) -> np.ndarray:
  """Bytes each device sends in one execution of the program, all kinds together."""
  return sum(collective_bytes_by_kind(hlo, num_devices).values())


def compiled_memory(compiled) -> dict[str, int]:
  """The compiled program's per-device memory analysis (also on CPU): its parts and total."""
  m = compiled.memory_analysis()
  return {'temp': int(m.temp_size_in_bytes), 'arguments': int(m.argument_size_in_bytes),
          'outputs': int(m.output_size_in_bytes), 'aliased': int(m.alias_size_in_bytes),
          'total': compiled_memory_bytes(compiled)}


def wall_and_cpu(fn, repeats: int) -> dict[str, float]:
  """Median/min/max wall seconds and median process CPU seconds of `fn()`, after a warm-up."""
  fn()
  wall, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return {'median': float(np.median(wall)), 'min': float(np.min(wall)),
          'max': float(np.max(wall)), 'cpu_median': float(np.median(cpu))}
