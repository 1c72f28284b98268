"""The automatic parallel plan on the real program: the modelled ranking of
`parallelism/planner`, then each leading candidate's train step compiled for its mesh (its
compiled per-device memory decides feasibility), `mesh.auto` for train.py, and `calibrate`,
which measures this machine's profile.

A row is "compiled" when this process had the candidate's device count of the target's
backend (fake CPU devices count: XLA_FLAGS=--xla_force_host_platform_device_count=N), else
"modelled" only.
"""

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from modeling import attention as attention_lib
from parallelism import mesh as mesh_lib
from parallelism.planner import hardware as hw_lib
from parallelism.planner import search, workload as workload_lib
from parallelism.planner.estimate import Candidate, Estimate, head_layout
from training.metrics import perf

log = logging.getLogger('loomax')


@dataclasses.dataclass
class Row:
  candidate: Candidate
  estimate: Estimate
  compiled_bytes: float | None = None   # per device; None = not compiled
  refused: str = ''                     # the start-up guard's message, if it refused
  feasible: bool = True                 # fits the budget (compiled figure where there is one)

  @property
  def checked(self) -> str:
    return 'refused' if self.refused else ('compiled' if self.compiled_bytes is not None
                                           else 'modelled')


def apply(config: ml_collections.ConfigDict, c: Candidate, *, seq_len: int | None = None,
          global_tokens: int | None = None) -> ml_collections.ConfigDict:
  """A copy of `config` with the candidate's keys (and the planned length and batch)."""
  out = ml_collections.ConfigDict(config.to_dict())
  for key, value in c.overrides().items():
    node = out
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  if seq_len:
    out.seq_len = seq_len
  if global_tokens:
    out.batch_size = global_tokens // out.seq_len
  return out


def flags(c: Candidate) -> str:
  """The candidate as train.py overrides to paste."""
  return ' '.join(f'--config.{k}={v}' for k, v in c.overrides().items())


def compile_memory(config: ml_collections.ConfigDict, devices) -> float:
  """Per-device bytes of the configured train step compiled on `devices` (raises ValueError
  when a start-up guard refuses the combination)."""
  from training.program import build_program   # the composition root
  mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
  program = build_program(config, mesh)
  return float(perf.compiled_memory_bytes(program.compiled_train_step()))


def plan(config: ml_collections.ConfigDict, *, devices: int, memory_bytes: float,
         seq_len: int, global_tokens: int, hw: hw_lib.Hardware, compile: str = 'auto',
         top: int = 5, max_compiles: int = 12, **search_kwargs) -> list[Row]:
  """The ranked plan: the modelled order, with the leading candidates compiled (when this
  process has `devices` devices) until `top` compiled ones fit or `max_compiles` ran.

  The analytic memory model is a pruning aid, not the verdict: every compile also corrects
  it, as the median compiled / modelled ratio seen so far scales the modelled memory of the
  candidates not yet compiled (a candidate is compiled only if its corrected figure fits).
  Returns the feasible rows first (compiled before modelled, then by modelled step time)."""
  w = workload_lib.from_config(config, seq_len, global_tokens)
  ranked = search.plan(w, hw, devices, memory_bytes, **search_kwargs)
  rows = [Row(p.candidate, p.estimate, feasible=p.fits) for p in ranked]
  local = jax.devices()
  # A CPU compile of a GPU target would measure another program (XLA:CPU has no cuDNN or
  # Pallas GPU kernels, and other fusions): compile only on the target's own backend.
  can_compile = (compile != 'never' and len(local) >= devices
                 and hw.kind == jax.default_backend())
  if compile == 'always' and not can_compile:
    raise ValueError(f'--compile=always needs {devices} {hw.kind} devices here; this process '
                     f'has {len(local)} ({jax.default_backend()})')
  ratios, scale, done, fitting = [], 1.0, 0, 0
  for row in rows:
    modelled = row.estimate.memory['total']
    if not can_compile or done >= max_compiles or fitting >= top:
      row.feasible = row.feasible and modelled * scale <= memory_bytes
      continue
    if not row.feasible or modelled * scale > memory_bytes:
      row.feasible = False
      continue
    cfg = apply(config, row.candidate, seq_len=seq_len, global_tokens=global_tokens)
    done += 1
    try:
      row.compiled_bytes = compile_memory(cfg, local[:devices])
    except ValueError as e:
      row.refused, row.feasible = str(e).splitlines()[0], False
      continue
    ratios.append(row.compiled_bytes / modelled)
    scale = max(float(np.median(ratios)), 1.0)
    row.feasible = row.compiled_bytes <= memory_bytes
    fitting += row.feasible
  if can_compile:
    log.info('planner: %d compiled, memory model corrected by x%.2f', done, scale)
  order = lambda r: (not r.feasible, r.checked != 'compiled', r.estimate.time['step'])
  return sorted(rows, key=order)


def device_memory() -> float | None:
  """Bytes of memory on this backend's first device, where the backend reports it."""
  stats = jax.devices()[0].memory_stats() or {}
  return float(stats['bytes_limit']) if 'bytes_limit' in stats else None


def profile_for_backend() -> hw_lib.Hardware:
  """The profile of the devices this process sees (by device kind), or cpu."""
  kind = jax.devices()[0].device_kind.lower()
  for name in ('h200', 'h100'):
    if name in kind:
      return hw_lib.PROFILES[name]
  if 'v5p' in kind:
    return hw_lib.PROFILES['tpu-v5p']
  return hw_lib.PROFILES['cpu']


def auto_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`mesh.auto=True`: the planner's first choice for the devices this run sees (logged with
  the runner-up); the config with its keys set."""
  a = config.mesh
  hw = hw_lib.parse(a.auto_hardware) if a.auto_hardware else profile_for_backend()
  memory = a.auto_memory_gib * hw_lib.GIB or device_memory() or hw.memory_bytes
  n = jax.device_count()
  rows = plan(config, devices=n, memory_bytes=memory, seq_len=config.seq_len,
              global_tokens=config.batch_size * config.seq_len, hw=hw, top=2)
  good = [r for r in rows if r.feasible]
  if not good:
    raise ValueError(f'mesh.auto: no plan fits {memory / hw_lib.GIB:.2f} GiB per device on {n} '
                     'devices: lower batch_size or seq_len, or set mesh.auto_memory_gib')
  for tag, r in zip(('chosen', 'runner-up'), good):
    log.info('mesh.auto %s: %s (modelled step %.3g s, memory %.1f MiB %s)', tag,
             r.candidate.describe(), r.estimate.time['step'],
             (r.compiled_bytes or r.estimate.memory['total']) / 2**20, r.checked)
  out = apply(config, good[0].candidate)
  out.mesh.auto = False
  return out


# ------------------------------------------------------------------ calibration

def _time(fn, *args, repeats: int = 3) -> float:
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def _grad_time(fn, args) -> float:
  """Seconds of one forward + backward of the scalar `fn` (best of 3)."""
  return _time(jax.jit(jax.grad(fn, tuple(range(len(args))))), *args)


def _lone_peak(device, matmul: int = 2048) -> float:
  """FLOP/s of one [matmul, matmul] product on `device` alone (the kernels' share baseline)."""
  one = jax.device_put(jnp.ones((matmul, matmul), jnp.float32) / matmul, device)
  return 2 * matmul ** 3 / _time(jax.jit(lambda a: a @ a), one)


def _causal_attention_loss(kernel, ids, pos):
  """A scalar of `kernel`'s causal self-attention over (q, k, v), for timing its gradient."""
  return lambda q, k, v: kernel(q, k, v, q_segment_ids=ids, kv_segment_ids=ids,
                                q_positions=pos, kv_positions=pos, causal=True).sum()


def calibrate(devices=None, *, name: str = 'calibrated', seq_len: int = 1024,
              heads: int = 4, head_dim: int = 64, matmul: int = 2048) -> hw_lib.Hardware:
  """This machine's profile: matmul peak per device with every device busy at once, the
  attention kernels' share of a lone device's matmul rate (fwd + bwd, causal), and a ring
  collective-permute's latency and bandwidth. Train-step matmuls are smaller than the peak
  trial's: their share is measured on a [4096, 256] x [256, 768] product. Memory is the
  backend's, or the cpu profile's."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  mesh = Mesh(np.asarray(devices), ('d',))
  peak = max(perf.measure_peak_trials(mesh, n=matmul, trials=5)) / n
  lone_peak = _lone_peak(devices[0], matmul)
  q = jax.device_put(jnp.ones((1, seq_len, heads, head_dim), jnp.float32) * 0.1, devices[0])
  ids = jax.device_put(jnp.ones((1, seq_len), jnp.int32), devices[0])
  pos = jax.device_put(jnp.arange(seq_len, dtype=jnp.int32)[None], devices[0])
  flops = 3 * 4 * seq_len * seq_len / 2 * heads * head_dim
  shares = []
  for impl in ('xla', 'blockwise'):
    loss = _causal_attention_loss(attention_lib.KERNELS[impl], ids, pos)
    shares.append((impl, flops / _grad_time(loss, (q, q, q)) / lone_peak))
  x = jax.device_put(jnp.ones((4096, 256), jnp.float32), devices[0])
  y = jax.device_put(jnp.ones((256, 768), jnp.float32) / 256, devices[0])
  matmul_share = 2 * 4096 * 256 * 768 / _time(jax.jit(jnp.matmul), x, y) / lone_peak
  lat = bw = None
  if n > 1:
    sharding = NamedSharding(mesh, P('d'))
    shift = jax.jit(jax.shard_map(lambda x: jax.lax.ppermute(
        x, 'd', [(i, (i + 1) % n) for i in range(n)]), mesh=mesh, in_specs=P('d'),
        out_specs=P('d')))
    small = jax.device_put(jnp.ones((n, 256), jnp.float32), sharding)
    big = jax.device_put(jnp.ones((n, 4 * 2 ** 20), jnp.float32), sharding)   # 16 MiB each
    lat = _time(shift, small, repeats=10)
    bw = 16 * 2 ** 20 / max(_time(shift, big) - lat, 1e-9)
  base = hw_lib.PROFILES['cpu' if jax.default_backend() == 'cpu' else 'h100']
  return dataclasses.replace(
      base, name=name, kind=base.kind, peak_flops=peak,
      memory_bytes=device_memory() or base.memory_bytes,
      intra_bytes_per_s=bw or base.intra_bytes_per_s,
      inter_bytes_per_s=bw or base.inter_bytes_per_s, latency_s=lat or base.latency_s,
      matmul_efficiency=min(matmul_share, 1.0), attention_efficiency=tuple(shares),
      source=f'measured by training/autoplan.calibrate on {n} {jax.default_backend()} '
             f'device(s), {time.strftime("%Y-%m-%d")}')


def calibrate_workload(hw: hw_lib.Hardware, config: ml_collections.ConfigDict, *, devices: int,
                       seq_len: int, length: int = 2048) -> hw_lib.Hardware:
  """`hw` with the kernel speeds this workload runs at, measured on one local device: the
  matmul share at the model's [tokens, d_model] x [d_model, mlp_dim] shape, the attention
  share of every kernel at every per-device head layout a candidate can have (heads over
  each tensor degree) and under each remat policy (one layout), and the family's recurrence
  scan (registry `scan_probe`), each at
  min(seq_len, length) tokens, forward + backward. Needs the target's backend here."""
  if hw.kind != jax.default_backend():
    raise ValueError(f'calibrating for {hw.kind} needs {hw.kind} devices; this process has '
                     f'{jax.default_backend()}')
  from modeling import registry, transformer
  m = config.model
  dev = jax.devices()[0]
  L = min(seq_len, length)
  lone_peak = _lone_peak(dev)
  put = lambda x: jax.device_put(x, dev)
  x = put(jnp.ones((4096, m.d_model), jnp.float32))
  y = put(jnp.ones((m.d_model, m.mlp_dim), jnp.float32) / m.d_model)
  matmul_share = 2 * 4096 * m.d_model * m.mlp_dim / _time(jax.jit(jnp.matmul), x, y) / lone_peak
  layouts, remat = [], []
  H, K, Dh = m.num_heads, m.num_kv_heads, m.head_dim
  ids, pos = put(jnp.ones((1, L), jnp.int32)), put(jnp.arange(L, dtype=jnp.int32)[None])
  for t in sorted({t for t in range(1, devices + 1) if devices % t == 0 and H % t == 0
                   and t <= hw.devices_per_node}):
    h, k = head_layout(H, K, t)
    r = np.random.RandomState(t)
    q = put(r.randn(1, L, h, Dh).astype(np.float32))
    kv = put(r.randn(1, L, k, Dh).astype(np.float32))
    flops = 3 * 4 * L * L / 2 * h * Dh
    for impl in search.ATTENTION[hw.kind]:
      loss = _causal_attention_loss(attention_lib.KERNELS[impl], ids, pos)
      seconds = _grad_time(loss, (q, kv, kv))
      layouts.append((impl, h, k, flops / seconds / lone_peak))
      if t == 1:   # each remat policy's cost on this kernel, as a ratio to no remat
        for policy in search.REMAT[1:]:
          wrapped = jax.checkpoint(loss, policy=transformer.remat_policy(policy))
          remat.append((impl, policy, _grad_time(wrapped, (q, kv, kv)) / seconds))
  scan_share = hw.scan_efficiency
  probe = registry.get_family(m.name).scan_probe
  if probe is not None:
    fn, args, flops = probe(m, L)
    scan_share = 3 * flops / _grad_time(fn, tuple(put(a) for a in args)) / lone_peak
  return dataclasses.replace(
      hw, matmul_efficiency=min(matmul_share, 1.0), attention_layouts=tuple(layouts),
      attention_remat=tuple(remat),
      scan_efficiency=scan_share,
      source=f'{hw.source}; kernel shares measured at this workload\'s shapes on 1 '
             f'{jax.default_backend()} device, {time.strftime("%Y-%m-%d")}')
