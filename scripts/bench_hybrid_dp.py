"""Hybrid data parallelism vs static data x context and plain packing, on one long-tail batch.

    python scripts/bench_hybrid_dp.py                    # defaults below (~minutes on CPU)
    python scripts/bench_hybrid_dp.py --dist=lognormal --scale=96 --shape=1.3 --docs=64

One global batch of documents with long-tail lengths (default Pareto: 32 x (1 + Lomax(1.2)),
rounded up, capped at 8 x C; or --dist=lognormal) on 8 fake CPU devices, float32, the same
documents for all three:
  hdp      parallelism/hybrid_dp.py: per-document group size in {1,2,4,8}, C tokens per device
           per micro-batch, zigzag ring inside each group; micro-batches of one group size each
  static   mesh context=8 (data=1): documents first-fit packed into rows of 8C, every row over
           all 8 devices with the zigzag ring (the only static mesh that fits a document of 8C)
  packing  mesh data=8, no context parallelism: documents first-fit packed into rows of 8C
           (the longest document must fit one row), rows spread over the 8 devices
Columns (docs/measuring.md):
  MiB sent/dev  bytes one device sends per step, from the optimized HLO (collective-permute
                pairs, all-reduce 2(N-1)/N, loops x trip count), mean over devices, summed
                over every program the step runs (hdp: each micro-batch + the update)
  ring/grad     the same split: attention ring traffic / gradient reduction
  flops max/mean  per-device model FLOPs (3 x forward: linear per real token + causal
                (query, key) pairs at the query's device), measured from the device buffers
  lockstep      sum over micro-batches of the busiest device's FLOPs / mean per-device total
                (what a synchronous step pays); = max/mean for one-program baselines
  padding       1 - real tokens / token slots the devices compute
  programs      compiled programs the step uses
  step s        wall time of one step after a warm-up, median of --repeats (noisy: shared CPU)
"""

import argparse
import os
import sys
import time

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import base
from parallelism import hybrid_dp
from training import hybrid_exec
from parallelism import mesh as mesh_lib
from parallelism import rules as rules_lib
from parallelism.context import layout
from training.perf import collective_bytes_per_device
from training import step as step_lib
from training.composition import make_runtime
from training.state import init_train_state, setup_model

MiB = 2 ** 20
N = 8


def bench_config(capacity: int, block: int):
  c = base.get_config()
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = 2, 64, 4, 2, 16
  m.mlp_dim, m.vocab_size = 128, 256
  c.attention.impl = 'blockwise'
  c.attention.block_q = c.attention.block_kv = block
  c.parallelism.hybrid_dp.enabled = True
  c.parallelism.hybrid_dp.capacity = capacity
  return c


def make_docs(n: int, dist: str, scale: float, shape: float, cap: int, seed: int):
  r = np.random.RandomState(seed)
  if dist == 'pareto':  # scale x (1 + Lomax(shape)): density ~ s^-(shape+1) above `scale`
    raw = scale * (1 + r.pareto(shape, n))
  elif dist == 'lognormal':  # median `scale`, sigma `shape`
    raw = r.lognormal(np.log(scale), shape, n)
  else:
    raise ValueError(f'--dist={dist!r}; valid: pareto, lognormal')
  lengths = np.minimum(np.ceil(raw), cap).astype(int)
  lengths = np.maximum(lengths, 2)
  return [r.randint(1, 256, s).astype(np.int32) for s in lengths]


def packed_rows(docs, row_len: int, rows_multiple: int = 1):
  """First-fit decreasing into rows of `row_len`; [R, row_len] arrays."""
  rows, fill = [], []
  for i in sorted(range(len(docs)), key=lambda i: -len(docs[i])):
    j = next((j for j, f in enumerate(fill) if f + len(docs[i]) <= row_len), None)
    if j is None:
      rows.append([])
      fill.append(0)
      j = len(rows) - 1
    rows[j].append(i)
    fill[j] += len(docs[i])
  R = -(-len(rows) // rows_multiple) * rows_multiple
  b = {k: np.zeros((R, row_len), np.int32) for k in hybrid_dp.FIELDS}
  b['targets'][:] = -1
  for r, members in enumerate(rows):
    f = 0
    for seg, i in enumerate(members, start=1):
      d = docs[i]
      s = len(d)
      b['inputs'][r, f:f + s], b['targets'][r, f:f + s - 1] = d, d[1:]
      b['segment_ids'][r, f:f + s], b['positions'][r, f:f + s] = seg, np.arange(s)
      f += s
  return b


def split_bytes(hlo: str) -> tuple[float, float]:
  """(attention ring bytes, everything else) mean per device: the ring is the only user of
  collective-permute here, gradients use all-reduce."""
  total = collective_bytes_per_device(hlo, N).mean()
  no_permute = '\n'.join(line for line in hlo.splitlines()
                         if 'collective-permute' not in line)
  rest = collective_bytes_per_device(no_permute, N).mean()
  return total - rest, rest


def timed(fn, repeats: int) -> float:
  fn()  # warm-up (compiles)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def run_hdp(c, docs, cost, state0, repeats):
  mesh = mesh_lib.make_mesh(c.mesh)
  setup = setup_model(c, mesh, make_runtime(c, mesh))
  ex = hybrid_exec.Executor(c, mesh, setup)
  h = c.parallelism.hybrid_dp
  t0 = time.perf_counter()
  plan = hybrid_dp.plan([len(d) for d in docs], ex.pool, h.capacity, layouts=h.layouts,
                        slack=h.slack, cost=cost, whole_groups=ex.whole_groups)
  micro = hybrid_dp.batch_buffers(plan, docs)
  plan_s = time.perf_counter() - t0
  per_mb = np.stack([hybrid_dp.buffer_flops(b, cost) for _, b in micro])
  on_device = [(g, ex.put(b)) for g, b in micro]
  state = jax.device_put(state0, setup.shardings)

  def step():
    out = ex.train_step(jax.tree.map(lambda x: x.copy(), state), on_device)
    jax.block_until_ready(out)
    return out

  step_s = timed(step, repeats)
  # Bytes: each micro-batch program's HLO once per micro-batch, plus the update's.
  acc = ex._zeros(state.params)
  zeros = jax.device_put(np.zeros(N, np.float32), ex.per_device)
  hlo = {g: ex.program(g).lower(state.params, acc, zeros, zeros, b, state.rng).compile().as_text()
         for g, b in dict(on_device).items()}
  ring = sum(split_bytes(hlo[g])[0] for g, _ in micro)
  grad = sum(split_bytes(hlo[g])[1] for g, _ in micro)
  upd = split_bytes(ex._update.lower(state, zeros, zeros, acc).compile().as_text())
  loss = float(step()[1]['loss'])
  return {'ring': ring + upd[0], 'grad': grad + upd[1], 'flops': per_mb.sum(0),
          'lockstep': per_mb.max(1).sum() / per_mb.sum(0).mean(),
          'padding': plan.padding_fraction(), 'programs': ex.program_count, 'step_s': step_s,
          'loss': loss, 'plan_s': plan_s, 'counts': plan.micro_batch_counts()}


def run_static(c, docs, cost, state0, repeats, context: int):
  """One train-step program over rows of 8C: context=8 ring, or data=8 without context."""
  c = c.copy_and_resolve_references()
  c.parallelism.hybrid_dp.enabled = False
  row = N * c.parallelism.hybrid_dp.capacity
  c.mesh.data, c.mesh.context = N // context, context
  c.parallelism.context_impl = 'ring' if context > 1 else 'none'
  mesh = mesh_lib.make_mesh(c.mesh)
  runtime = make_runtime(c, mesh)
  setup = setup_model(c, mesh, runtime)
  host = packed_rows(docs, row, rows_multiple=N // context)
  host = layout.host_layout(c, mesh)(host) if context > 1 else host
  R = host['inputs'].shape[0]
  # Per-device buffers: row blocks over data, each row's 1/context over context.
  dev = {k: v.reshape(N // context, R // (N // context), context, row // context)
         .transpose(0, 2, 1, 3).reshape(N, -1) for k, v in host.items()}
  flops = hybrid_dp.buffer_flops(dev, cost)
  b_sharding = rules_lib.named_sharding((R, row), ('batch', 'length'), c.parallelism.rules,
                                        mesh, 'batch')
  fn = jax.jit(step_lib.make_train_step(setup), in_shardings=(setup.shardings, b_sharding),
               out_shardings=(setup.shardings, NamedSharding(mesh, P())))
  batch = {k: jax.device_put(v, b_sharding) for k, v in host.items()}
  state = jax.device_put(state0, setup.shardings)

  def step():
    out = fn(state, batch)
    jax.block_until_ready(out)
    return out

  step_s = timed(step, repeats)
  ring, grad = split_bytes(fn.lower(state, batch).compile().as_text())
  real = (host['segment_ids'] > 0).sum()
  return {'ring': ring, 'grad': grad, 'flops': flops, 'lockstep': flops.max() / flops.mean(),
          'padding': 1 - real / host['inputs'].size, 'programs': 1, 'step_s': step_s,
          'loss': float(step()[1]['loss']), 'counts': {f'rows {row}': R}}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--capacity', type=int, default=256, help='C: tokens per device')
  ap.add_argument('--docs', type=int, default=128)
  ap.add_argument('--dist', default='pareto', help='pareto | lognormal')
  ap.add_argument('--scale', type=float, default=32.0, help='pareto: minimum; lognormal: median')
  ap.add_argument('--shape', type=float, default=1.2, help='pareto: alpha; lognormal: sigma')
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--repeats', type=int, default=2)
  ap.add_argument('--smoke', action='store_true', help='seconds-long check: C=64, 12 documents')
  args = ap.parse_args()
  if args.smoke:
    args.capacity, args.docs, args.scale, args.repeats = 64, 12, 16.0, 1
  C = args.capacity
  c = bench_config(C, block=min(64, C // 2))
  docs = make_docs(args.docs, args.dist, args.scale, args.shape, N * C, args.seed)
  lengths = np.array([len(d) for d in docs])
  cost = hybrid_dp.CostModel.for_model(c.model)
  one = mesh_lib.make_mesh(c.mesh)
  rt = make_runtime(c, one)
  state0 = jax.device_get(init_train_state(c, setup_model(c, one, rt), rt))

  rows = {'hdp': run_hdp(c, docs, cost, state0, args.repeats),
          'static': run_static(c, docs, cost, state0, args.repeats, context=N),
          'packing': run_static(c, docs, cost, state0, args.repeats, context=1)}
  print(f'# bench_hybrid_dp | backend {jax.default_backend()} | {jax.device_count()} x '
        f'{jax.devices()[0].device_kind} | jax {jax.__version__} | float32')
  print(f'# model: 2 layers, d=64, 4 heads (2 kv), head dim 16, mlp 128, vocab 256, blockwise '
        f'attention (block {c.attention.block_q}); C={C} tokens/device, 8 devices')
  dist = (f'{args.scale:g} x (1 + Lomax({args.shape:g})) (Pareto)' if args.dist == 'pareto'
          else f'lognormal(median {args.scale:g}, sigma {args.shape:g})')
  print(f'# batch: {len(docs)} docs, lengths ceil({dist}) capped at 8C={N * C}, seed '
        f'{args.seed}: {lengths.sum()} tokens, min {lengths.min()} '
        f'median {int(np.median(lengths))} max {lengths.max()}, {(lengths > C).sum()} docs > C')
  print(f'# hdp micro-batches per group size: {rows["hdp"]["counts"]}; plan + buffers on host '
        f'{rows["hdp"]["plan_s"] * 1e3:.0f} ms; slack {c.parallelism.hybrid_dp.slack}')
  print(f'{"run":<8} {"MiB sent/dev":>12} {"ring/grad MiB":>15} {"flops max/mean":>14} '
        f'{"lockstep":>8} {"padding":>8} {"programs":>8} {"step s":>7} {"loss":>7}')
  for name, r in rows.items():
    print(f'{name:<8} {(r["ring"] + r["grad"]) / MiB:12.2f} '
          f'{r["ring"] / MiB:7.2f}/{r["grad"] / MiB:<7.2f} '
          f'{r["flops"].max() / r["flops"].mean():14.3f} {r["lockstep"]:8.3f} '
          f'{r["padding"]:8.3f} {r["programs"]:8d} {r["step_s"]:7.2f} {r["loss"]:7.4f}')
  h, s = rows['hdp'], rows['static']
  print(f'# summary: hdp sends {(h["ring"] + h["grad"]) / (s["ring"] + s["grad"]):.2f}x the '
        f'static data x context bytes, per-device FLOP imbalance '
        f'{h["flops"].max() / h["flops"].mean():.3f}'
        f' (static {s["flops"].max() / s["flops"].mean():.3f}, packing '
        f'{rows["packing"]["flops"].max() / rows["packing"]["flops"].mean():.3f}); same loss '
        f'{abs(h["loss"] - s["loss"]) < 1e-4 and abs(h["loss"] - rows["packing"]["loss"]) < 1e-4}')


if __name__ == '__main__':
  main()
