"""Measuring this machine for the planner (`parallelism/planner`): what the step-time model
cannot know from data sheets.

  calibrate           the machine: matmul peak per device with every device busy, the
                      attention kernels' share of it, a collective's latency and bandwidth
  calibrate_workload  one workload's kernels on one local device: the matmul share at the
                      model's shapes, attention at every per-device head layout and under
                      every remat policy, the family's recurrence scan
  calibrate_layouts   one workload's context-parallel layouts on this process's devices: each
                      context strategy's attention, and the recurrence scan, at every
                      (context, tensor) split of one row at the target length, as a factor
                      over the same work unsplit

Every timing is forward + backward with the forward's value used, as in a train step (a
`jax.grad` alone lets XLA drop the forward pass that a remat policy recomputes, so a policy
would look free).
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from modeling import attention as attention_lib
from modeling import axes as ax
from parallelism import mesh as mesh_lib
from parallelism import rules as rules_lib
from parallelism.planner import hardware as hw_lib
from parallelism.planner import search
from parallelism.planner.estimate import Candidate, head_layout
from training.metrics import perf


def _time(fn, *args, repeats: int = 3, clock=time.perf_counter) -> float:
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(repeats):
    t0 = clock()
    jax.block_until_ready(fn(*args))
    best = min(best, clock() - t0)
  return best


def _grad_time(fn, args, **kwargs) -> float:
  """Seconds of one forward (its value kept) + backward of the scalar `fn` (best of 3)."""
  return _time(jax.jit(jax.value_and_grad(fn, tuple(range(len(args))))), *args, **kwargs)


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
  from training.autoplan import device_memory
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
      source=f'measured by training/calibration.calibrate on {n} {jax.default_backend()} '
             f'device(s), {time.strftime("%Y-%m-%d")}')


def _check_backend(hw: hw_lib.Hardware) -> None:
  if hw.kind != jax.default_backend():
    raise ValueError(f'calibrating for {hw.kind} needs {hw.kind} devices; this process has '
                     f'{jax.default_backend()}')


def calibrate_workload(hw: hw_lib.Hardware, config: ml_collections.ConfigDict, *, devices: int,
                       seq_len: int, length: int = 2048) -> hw_lib.Hardware:
  """`hw` with the kernel speeds this workload runs at, measured on one local device: the
  matmul share at the model's [tokens, d_model] x [d_model, mlp_dim] shape, the attention
  share of every kernel at every per-device head layout a candidate can have (heads over
  each tensor degree) and under each remat policy (one layout), and the family's recurrence
  scan (registry `scan_probe`), each at
  min(seq_len, length) tokens, forward + backward. Needs the target's backend here."""
  _check_backend(hw)
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


def _layouts(devices: int, heads: int, seq_len: int, per_node: int):
  """(context, tensor) splits a candidate on `devices` can have (the rest is data)."""
  return [(c, t) for c in range(1, devices + 1) for t in range(1, devices + 1)
          if devices % (c * t) == 0 and heads % t == 0 and t <= per_node
          and seq_len % (2 * c) == 0]


def _mesh(config, c: int, t: int, impl: str, kernel: str, devices):
  """The config and mesh of one row split over context x tensor: the first c x t devices."""
  from training.autoplan import apply
  cfg = apply(config, Candidate(1, 1, c, t, impl if c > 1 else 'none', kernel, 'none', 1))
  return cfg, mesh_lib.make_mesh(cfg.mesh, devices=devices[:c * t])


def _put(x, logical, cfg, mesh):
  return jax.device_put(x, rules_lib.named_sharding(x.shape, logical, cfg.parallelism.rules,
                                                    mesh, 'calibration input'))


def _attention_seconds(config, c, t, impl, kernel, devices, L, clock) -> tuple[float, float]:
  """(seconds, causal FLOPs) of one context-parallel self-attention, fwd + bwd, on the mesh."""
  from parallelism.context import layout
  from training import composition
  cfg, mesh = _mesh(config, c, t, impl, kernel, devices)
  m = cfg.model
  rows = 1
  attend = composition.make_attend(cfg, mesh)
  pos = np.broadcast_to(np.arange(L, dtype=np.int32), (rows, L))
  if composition.context_layout.uses_zigzag(cfg, mesh):
    pos = layout.to_zigzag(pos, c)
  r = np.random.RandomState(c * 16 + t)
  q, k, v = (r.randn(rows, L, n, m.head_dim).astype(np.float32) * 0.3
             for n in (m.num_heads, m.num_kv_heads, m.num_kv_heads))
  seq = (ax.BATCH, ax.LENGTH)
  ids = _put(np.ones((rows, L), np.int32), seq, cfg, mesh)
  pos = _put(np.ascontiguousarray(pos), seq, cfg, mesh)
  q = _put(q, (*seq, ax.ACT_HEADS, None), cfg, mesh)
  kv_axes = (*seq, ax.ACT_HEADS if m.num_kv_heads % t == 0 else None, None)
  k, v = _put(k, kv_axes, cfg, mesh), _put(v, kv_axes, cfg, mesh)
  loss = lambda q, k, v: attend(q, k, v, q_segment_ids=ids, kv_segment_ids=ids,
                                q_positions=pos, kv_positions=pos, causal=True).sum()
  seconds = _grad_time(loss, (q, k, v), repeats=3, clock=clock)
  return seconds, rows * L * L / 2 * m.num_heads * m.head_dim


def _scan_seconds(config, c, t, devices, L, clock) -> tuple[float, float]:
  """(seconds, FLOPs) of one recurrence scan over the (context, tensor) split, fwd + bwd."""
  from modeling import registry, ssm
  from training import composition
  cfg, mesh = _mesh(config, c, t, 'ring', 'blockwise', devices)
  family = registry.get_family(cfg.model.name)
  rows = 1
  _, (x, dt, A, B, C), flops = family.scan_probe(cfg.model, L)
  if c > 1:
    rec = composition.make_recurrence(cfg, mesh)
  else:
    rec = ssm.LocalRecurrence(family.recurrence_scan(cfg.model)[0])
  tile = lambda a: np.ascontiguousarray(np.broadcast_to(a, (rows, *a.shape[1:])))
  seq = (ax.BATCH, ax.LENGTH)
  x, dt = (_put(tile(a), (*seq, ax.ACT_MLP), cfg, mesh) for a in (x, dt))
  B, C = (_put(tile(a), (*seq, None), cfg, mesh) for a in (B, C))
  A = _put(A, (ax.ACT_MLP, None), cfg, mesh)
  seg = _put(np.ones((rows, L), np.int32), seq, cfg, mesh)
  loss = lambda x, dt, A, B, C: rec.scan(x, dt, A, B, C, segment_ids_BL=seg)[0].sum()
  return _grad_time(loss, (x, dt, A, B, C), repeats=3, clock=clock), rows * flops


def calibrate_layouts(hw: hw_lib.Hardware, config: ml_collections.ConfigDict, *, devices: int,
                      seq_len: int, length: int = 0,
                      dense_cap_bytes: float = 2 ** 29) -> hw_lib.Hardware:
  """`hw` with each (context, tensor) split a candidate on `devices` can have measured on
  this process's devices: one row of seq_len tokens (capped at `length` if given: a ring's
  speed depends on its per-device chunk, so a shorter probe measures another kernel shape)
  on the split's c x t devices:

    context_attention  (kernel, strategy, context, tensor, factor): one self-attention
                       layer of the model's shape under the strategy with that per-block
                       kernel, as seconds per causal FLOP over the same kernel's with the
                       sequence whole (context 1, same tensor). It
                       holds what the FLOP count does not: the ring's transfers, its
                       per-step merges, smaller blocks.
    scan_layouts       (context, tensor, factor): the family's recurrence scan (the
                       distributed scan where context > 1), seconds per FLOP over one whole
                       sequence per device's.

  Factors compare seconds per FLOP of the whole computation (all its devices), so they hold
  the split's overheads and not its parallel speed-up, which the model has. Every kernel a
  ring can run is measured (the dense `xla` kernel only while its unsplit scores fit
  `dense_cap_bytes`). On XLA:CPU fake devices share the cores, so time is process CPU
  seconds (the devices' summed work, steady on a shared machine); elsewhere wall time x the
  devices used. Needs the target's backend and `devices` local devices."""
  _check_backend(hw)
  local = jax.devices()
  if len(local) < devices:
    raise ValueError(f'calibrating layouts for {devices} devices needs them here; this '
                     f'process has {len(local)}')
  from modeling import registry
  m = config.model
  devs = local[:devices]
  L = min(seq_len, length) if length else seq_len
  cpu = jax.default_backend() == 'cpu'
  splits = _layouts(devices, m.num_heads, L, hw.devices_per_node)

  def clock_for(n):   # seconds x devices: the computation's summed device time
    return time.process_time if cpu else (lambda: time.perf_counter() * n)

  # Every kernel a context-parallel candidate can run: a dense per-block kernel inside a ring
  # has other overheads than a blockwise one (whole score tiles, no skipped blocks).
  kernels = [k for k in search.ATTENTION[hw.kind] if k not in ('splash', 'jax_nn')]
  attention = []
  for t in sorted({t for c, t in splits if c > 1}):
    for kernel in kernels:
      # The dense kernel's unsplit baseline holds [heads, L, L] float32 scores: past
      # `dense_cap_bytes` it is not measured, and its candidates keep the modelled time.
      if kernel == 'xla' and 4 * L * L * m.num_heads / t > dense_cap_bytes:
        continue
      base_s, base_f = _attention_seconds(config, 1, t, 'none', kernel, devs, L, clock_for(t))
      for c in sorted(c for c, tt in splits if tt == t and c > 1):
        for impl in search.CONTEXT_IMPLS:
          s, f = _attention_seconds(config, c, t, impl, kernel, devs, L, clock_for(c * t))
          attention.append((kernel, impl, c, t, (s / f) / (base_s / base_f)))
  scans = []
  family = registry.get_family(m.name)
  if family.scan_probe is not None and family.uses_recurrence_seam:
    base_s, base_f = _scan_seconds(config, 1, 1, devs, L, clock_for(1))
    for c, t in splits:
      if (c, t) != (1, 1) and m.num_heads % t == 0:
        s, f = _scan_seconds(config, c, t, devs, L, clock_for(c * t))
        scans.append((c, t, (s / f) / (base_s / base_f)))
  return dataclasses.replace(
      hw, context_attention=tuple(attention), scan_layouts=tuple(scans),
      source=f'{hw.source}; context layouts measured on {devices} {jax.default_backend()} '
             f'devices at {L} tokens, {time.strftime("%Y-%m-%d")}')
