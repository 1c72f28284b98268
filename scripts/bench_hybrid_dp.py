"""Hybrid data parallelism vs static data x context meshes and plain packing, one long-tail batch.

    python scripts/bench_hybrid_dp.py                    # defaults below (~minutes on CPU)
    python scripts/bench_hybrid_dp.py --dist=lognormal --scale=96 --shape=1.3 --docs=64
    python scripts/bench_hybrid_dp.py --lengths_from=DIR  # real lengths (prepare_data.py output)
    python scripts/bench_hybrid_dp.py --json=rows.json    # the rows, machine-readable

One global batch of documents with long-tail lengths (default Pareto: 32 x (1 + Lomax(1.2)),
rounded up, capped at 8 x C; or --dist=lognormal; or --docs lengths sampled with --seed from an
ArrayRecord index's lengths.npy, capped at 8 x C) on 8 fake CPU devices, float32, the same
documents for every row:
  hdp          parallelism/hybrid/planner.py: per-document group sizes in {1,2,4,8}, several sizes per
               micro-batch (lockstep planner), C tokens per device per micro-batch, zigzag
               ring inside each group, one compiled program per layout
  hdp-uniform  the same with one group size per micro-batch (the previous planner; not in
               --smoke)
  static dDxcK mesh data=D x context=K: documents first-fit packed into rows of K x C, each row
               over K devices with the zigzag ring, rows spread over D (only meshes whose
               rows fit the longest document: context=8 always, data=2 x context=4 when the
               longest document is at most 4C; not in --smoke)
  packing      mesh data=8, no context parallelism: documents first-fit packed into rows of 8C
               (the longest document must fit one row), rows spread over the 8 devices
Columns (docs/measuring.md):
  MiB sent/dev  bytes one device sends per step, from the optimized HLO (collective-permute
                pairs, all-reduce 2(N-1)/N, loops x trip count), mean over devices, summed
                over every program the step runs (hdp: each micro-batch + the update)
  ring/grad     the same split: attention ring traffic / gradient reduction
  flops max/mean  executed per-device model FLOPs over the step (3 x forward: linear per real
                token + causal (query, key) pairs at the query's device), measured from the
                device buffers that run (hdp: summed over its micro-batches)
  lockstep      sum over micro-batches of the busiest device's executed FLOPs / mean
                per-device total (what a synchronous step pays); = max/mean for one program
  modelled      hdp: the planner's own lockstep figure (equals the executed one when the cost
                model counts what the buffers hold)
  padding       1 - real tokens / token slots the devices compute
  programs      compiled programs the step uses (hdp: layouts + the update)
  mb            hdp: micro-batches run one after another; static: rows per device
  step s        wall time of one step after a warm-up, median of --repeats (noisy: shared CPU;
                8 fake devices share the cores, so this tracks total work incl. padding)
  cpu s         process CPU time of the same step, median
"""

import argparse
import json
import os
import sys
import time

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--capacity', type=int, default=256, help='C: tokens per device')
  ap.add_argument('--docs', type=int, default=128)
  ap.add_argument('--dist', default='pareto', help='pareto | lognormal')
  ap.add_argument('--scale', type=float, default=32.0, help='pareto: minimum; lognormal: median')
  ap.add_argument('--shape', type=float, default=1.2, help='pareto: alpha; lognormal: sigma')
  ap.add_argument('--lengths_from', default='',
                  help='a prepare_data.py output directory: sample --docs real document lengths '
                       'from its lengths.npy (with --seed) instead of --dist')
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--json', default='', help='write the rows (and the batch) to this path')
  ap.add_argument('--smoke', action='store_true', help='seconds-long check: C=64, 12 documents')
  return ap.parse_args(argv)


if __name__ == '__main__':
  parse_args()  # --help and bad arguments answer here, before JAX's ~2 s import

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from configs import base  # noqa: E402
from parallelism.hybrid import planner as hybrid_dp  # noqa: E402
from training.hybrid import executor as hybrid_exec  # noqa: E402
from parallelism import mesh as mesh_lib  # noqa: E402
from parallelism import rules as rules_lib  # noqa: E402
from parallelism.context import layout  # noqa: E402
from training.metrics import perf  # noqa: E402
from training.metrics.perf import collective_bytes_per_device  # noqa: E402
from training import step as step_lib  # noqa: E402
from training.composition import make_runtime  # noqa: E402
from training.data import sources  # noqa: E402
from training.state import init_train_state, setup_model  # noqa: E402

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


def make_docs(n: int, dist: str, scale: float, shape: float, cap: int, seed: int,
              lengths_from: str = ''):
  r = np.random.RandomState(seed)
  if lengths_from:  # real document lengths: a sample of n (with the seed) from the index
    pool = np.asarray(sources.load_document_lengths(lengths_from))
    if len(pool) == 0:
      raise ValueError(f'--lengths_from={lengths_from}: no documents in its lengths file')
    raw = pool[r.choice(len(pool), n, replace=len(pool) < n)]
  elif dist == 'pareto':  # scale x (1 + Lomax(shape)): density ~ s^-(shape+1) above `scale`
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


def run_hdp(c, docs, cost, state0, repeats, mixed_layouts: bool = True):
  mesh = mesh_lib.make_mesh(c.mesh)
  setup = setup_model(c, mesh, make_runtime(c, mesh))
  ex = hybrid_exec.Executor(c, mesh, setup)
  h = c.parallelism.hybrid_dp
  t0 = time.perf_counter()
  plan = hybrid_dp.plan([len(d) for d in docs], ex.pool, h.capacity, layouts=h.layouts,
                        slack=h.slack, cost=cost, whole_groups=ex.whole_groups,
                        mixed_layouts=mixed_layouts)
  micro = hybrid_dp.batch_buffers(plan, docs)
  plan_s = time.perf_counter() - t0
  per_mb = np.stack([hybrid_dp.buffer_flops(b, cost) for _, b in micro])
  on_device = [(key, ex.put(b)) for key, b in micro]
  state = jax.device_put(state0, setup.shardings)

  def step():
    out = ex.train_step(jax.tree.map(lambda x: x.copy(), state), on_device)
    jax.block_until_ready(out)
    return out

  t = perf.wall_and_cpu(step, repeats)
  step_s, cpu_s = t['median'], t['cpu_median']
  # Bytes: each micro-batch program's HLO once per micro-batch, plus the update's.
  acc = ex._zeros(state.params)
  zeros = jax.device_put(np.zeros(N, np.float32), ex.per_device)
  hlo = {key: ex.program(key).lower(state.params, acc, zeros, zeros, b, state.rng).compile()
         .as_text() for key, b in dict(on_device).items()}
  ring = sum(split_bytes(hlo[key])[0] for key, _ in micro)
  grad = sum(split_bytes(hlo[key])[1] for key, _ in micro)
  upd = split_bytes(ex._update.lower(state, zeros, zeros, acc).compile().as_text())
  loss = float(step()[1]['loss'])
  return {'ring': ring + upd[0], 'grad': grad + upd[1], 'flops': per_mb.sum(0),
          'lockstep': per_mb.max(1).sum() / per_mb.sum(0).mean(),
          'modelled': plan.lockstep_cost(), 'padding': plan.padding_fraction(),
          'programs': ex.program_count, 'micro_batches': len(plan.micro_batches),
          'step_s': step_s, 'cpu_s': cpu_s, 'loss': loss, 'plan_s': plan_s,
          'layouts': sorted({str(mb.layout) for mb in plan.micro_batches})}


def run_static(c, docs, cost, state0, repeats, data: int, context: int, row: int):
  """One train-step program over rows of `row` tokens on mesh data x context (the ring over
  context when > 1)."""
  c = c.copy_and_resolve_references()
  c.parallelism.hybrid_dp.enabled = False
  c.mesh.data, c.mesh.context = data, context
  c.parallelism.context_impl = 'ring' if context > 1 else 'none'
  mesh = mesh_lib.make_mesh(c.mesh)
  runtime = make_runtime(c, mesh)
  setup = setup_model(c, mesh, runtime)
  host = packed_rows(docs, row, rows_multiple=data)
  host = layout.host_layout(c, mesh)(host) if context > 1 else host
  R = host['inputs'].shape[0]
  # Per-device buffers: row blocks over data, each row's 1/context over context.
  dev = {k: v.reshape(data, R // data, context, row // context)
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

  t = perf.wall_and_cpu(step, repeats)
  step_s, cpu_s = t['median'], t['cpu_median']
  ring, grad = split_bytes(fn.lower(state, batch).compile().as_text())
  real = (host['segment_ids'] > 0).sum()
  return {'ring': ring, 'grad': grad, 'flops': flops, 'lockstep': flops.max() / flops.mean(),
          'modelled': None, 'padding': 1 - real / host['inputs'].size, 'programs': 1,
          'micro_batches': R // data, 'step_s': step_s, 'cpu_s': cpu_s,
          'loss': float(step()[1]['loss']), 'layouts': [f'rows of {row}']}


def main():
  args = parse_args()
  if args.smoke:
    args.capacity, args.docs, args.scale, args.repeats = 64, 12, 16.0, 1
  C = args.capacity
  c = bench_config(C, block=min(64, C // 2))
  docs = make_docs(args.docs, args.dist, args.scale, args.shape, N * C, args.seed,
                   args.lengths_from)
  lengths = np.array([len(d) for d in docs])
  cost = hybrid_dp.CostModel.for_model(c.model)
  one = mesh_lib.make_mesh(c.mesh)
  rt = make_runtime(c, one)
  state0 = jax.device_get(init_train_state(c, setup_model(c, one, rt), rt))

  rows = {'hdp': run_hdp(c, docs, cost, state0, args.repeats)}
  if not args.smoke:
    rows['hdp-uniform'] = run_hdp(c, docs, cost, state0, args.repeats, mixed_layouts=False)
  rows['static d1xc8'] = run_static(c, docs, cost, state0, args.repeats, 1, N, N * C)
  if lengths.max() <= 4 * C and not args.smoke:
    rows['static d2xc4'] = run_static(c, docs, cost, state0, args.repeats, 2, 4, 4 * C)
  rows['packing'] = run_static(c, docs, cost, state0, args.repeats, N, 1, N * C)
  print(f'# bench_hybrid_dp | backend {jax.default_backend()} | {jax.device_count()} x '
        f'{jax.devices()[0].device_kind} | jax {jax.__version__} | float32')
  print(f'# model: 2 layers, d=64, 4 heads (2 kv), head dim 16, mlp 128, vocab 256, blockwise '
        f'attention (block {c.attention.block_q}); C={C} tokens/device, 8 devices')
  dist = (f'real lengths from {args.lengths_from}' if args.lengths_from else
          f'{args.scale:g} x (1 + Lomax({args.shape:g})) (Pareto)' if args.dist == 'pareto'
          else f'lognormal(median {args.scale:g}, sigma {args.shape:g})')
  print(f'# batch: {len(docs)} docs, lengths ceil({dist}) capped at 8C={N * C}, seed '
        f'{args.seed}: {lengths.sum()} tokens, min {lengths.min()} '
        f'median {int(np.median(lengths))} max {lengths.max()}, {(lengths > C).sum()} docs > C')
  print(f'# hdp layouts: {", ".join(rows["hdp"]["layouts"])}; plan + buffers on host '
        f'{rows["hdp"]["plan_s"] * 1e3:.0f} ms')
  print(f'{"run":<13} {"MiB sent/dev":>12} {"ring/grad MiB":>15} {"flops max/mean":>14} '
        f'{"lockstep":>8} {"modelled":>8} {"padding":>8} {"programs":>8} {"mb":>4} '
        f'{"step s":>7} {"cpu s":>7} {"loss":>7}')
  for name, r in rows.items():
    modelled = '-' if r['modelled'] is None else f'{r["modelled"]:.3f}'
    print(f'{name:<13} {(r["ring"] + r["grad"]) / MiB:12.2f} '
          f'{r["ring"] / MiB:7.2f}/{r["grad"] / MiB:<7.2f} '
          f'{r["flops"].max() / r["flops"].mean():14.3f} {r["lockstep"]:8.3f} {modelled:>8} '
          f'{r["padding"]:8.3f} {r["programs"]:8d} {r["micro_batches"]:4d} '
          f'{r["step_s"]:7.2f} {r["cpu_s"]:7.2f} {r["loss"]:7.4f}')
  h = rows['hdp']
  statics = {k: r for k, r in rows.items() if k.startswith('static')}
  best = min(statics, key=lambda k: statics[k]['lockstep'])
  ring = rows['static d1xc8']
  same_loss = all(abs(r['loss'] - h['loss']) < 1e-4 for r in rows.values())
  print(f'# summary: hdp lockstep {h["lockstep"]:.3f} vs best static ({best}) '
        f'{statics[best]["lockstep"]:.3f}; hdp step {h["step_s"]:.2f} s vs the static ring '
        f'{ring["step_s"]:.2f} s ({h["step_s"] / ring["step_s"]:.2f}x; cpu '
        f'{h["cpu_s"] / ring["cpu_s"]:.2f}x); same loss {same_loss}')
  if args.json:
    out = {'batch': {'docs': len(docs), 'tokens': int(lengths.sum()), 'capacity': C,
                     'source': dist, 'seed': args.seed, 'lengths': lengths.tolist()},
           'rows': [{'run': name, 'mib_sent_per_device': (r['ring'] + r['grad']) / MiB,
                     'ring_mib': r['ring'] / MiB, 'grad_mib': r['grad'] / MiB,
                     'flops_max_over_mean': float(r['flops'].max() / r['flops'].mean()),
                     'lockstep': float(r['lockstep']),
                     'modelled_lockstep': r['modelled'], 'padding': float(r['padding']),
                     'programs': r['programs'], 'micro_batches': r['micro_batches'],
                     'step_s': r['step_s'], 'cpu_s': r['cpu_s'], 'loss': r['loss'],
                     'layouts': r['layouts']} for name, r in rows.items()]}
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=1)
    print(f'# wrote {args.json}')


if __name__ == '__main__':
  from training.safety.errors import run_cli
  run_cli(main)
