"""Core-attention disaggregation vs data parallelism with packing vs ring context parallelism.

    python scripts/bench_disaggregation.py                 # seq 1024, 2 rows per device
    python scripts/bench_disaggregation.py --seq_len=2048 --repeats=5

One long-tail packed batch (a few documents of half to a whole row, many short ones, padding
at row ends; first-fit packing order) on 8 fake CPU devices, float32, model: 2 layers,
d=128, 4 heads (2 kv), head dim 32, SwiGLU 256, vocab 256, blockwise attention (block 128).
Rows: dp = data parallelism, 8 devices, packed rows as they come; ring = ring attention over
context=8 (zigzag) on the same rows; dca = disaggregated, data=8, planned per batch
(parallelism/disaggregation.py, tolerance from --tolerance, 2 nano-batches). Columns:
  attn flops max/mean  per-device causal attention work, exact query-key pairs of documents
              (padding excluded) x 4 H Dh, forward; ring counts its local queries' pairs
  attn MiB/l  bytes one device sends for one layer's attention, forward + backward, from the
              optimized HLO of the attention op alone (counting as scripts/bench_context.py:
              all-to-all sends (N-1)/N of its buffer); mean (max) over devices
  step MiB    the same count over the whole train step (adds gradient all-reduces)
  mem MiB     per-device memory of the compiled train step (memory_analysis)
  step s      median train-step time over --repeats after a warm-up (min-max); noisy: the 8
              fake devices share this machine's cores
  a2a sync/async  all-to-all ops in the train step's optimized HLO, synchronous vs async
              (-start/-done pairs); shows whether the backend can overlap the ping-pong
"""

import argparse
import os
import re
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
from modeling.attention import self_attention_kwargs
from parallelism import disaggregation as dca
from parallelism import mesh as mesh_lib
from parallelism import rules as rules_lib
from parallelism.context import layout
from training.perf import collective_bytes_per_device
from training import perf
from training import step as step_lib
from training.composition import make_attend, make_runtime
from training.state import init_train_state, setup_model

MiB = 2 ** 20
N = 8


def bench_config(name: str, seq_len: int, batch: int, tolerance: float):
  c = base.get_config()
  c.seq_len, c.batch_size, c.steps = seq_len, batch, 10
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = 2, 128, 4, 2, 32
  m.mlp_dim, m.vocab_size = 256, 256
  c.attention.impl = 'blockwise'
  c.attention.block_q = c.attention.block_kv = 128
  c.mesh.data, c.mesh.fsdp, c.mesh.context, c.mesh.tensor = N, 1, 1, 1
  c.parallelism.dca_tolerance = tolerance
  if name == 'ring':
    c.mesh.data, c.mesh.context = 1, N
    c.parallelism.context_impl = 'ring'
  elif name == 'dca':
    c.parallelism.context_impl = 'disaggregated'
  return c


def long_tail_batch(B: int, L: int, seed: int, vocab: int):
  """First-fit packed rows: 10% of documents L/2..L tokens, the rest 8..L/8 (long tail)."""
  r = np.random.RandomState(seed)
  rows = [[] for _ in range(B)]
  free = np.full(B, L)
  while True:
    n = r.randint(L // 2, L + 1) if r.rand() < 0.1 else r.randint(8, L // 8 + 1)
    fits = np.nonzero(free >= n)[0]
    if not len(fits):
      if free.max() < 8:
        break
      continue
    b = fits[0]
    rows[b].append(n)
    free[b] -= n
  seg = np.zeros((B, L), np.int32)
  pos = np.zeros((B, L), np.int32)
  for b, docs in enumerate(rows):
    t = 0
    for i, n in enumerate(docs):
      seg[b, t:t + n], pos[b, t:t + n] = i + 1, np.arange(n)
      t += n
  inputs = r.randint(1, vocab, (B, L)).astype(np.int32)
  targets = np.roll(inputs, -1, axis=1)
  targets[(np.roll(seg, -1, axis=1) != seg) | (seg == 0)] = -1
  targets[:, -1] = -1
  return {'inputs': inputs, 'targets': targets, 'segment_ids': seg, 'positions': pos}


def pairs_per_token(batch):
  """Causal keys each query sees: position + 1 inside a document, 0 for padding."""
  return np.where(batch['segment_ids'] > 0, batch['positions'] + 1, 0).astype(np.int64)


def flops_per_device(name, batch, c):
  unit = 4 * c.model.num_heads * c.model.head_dim
  if name == 'dca':
    plan_kw = dca.planner_kwargs(c)
    _, scheds = dca.plan_batch(batch['segment_ids'], batch['positions'], N, **plan_kw)
    return dca.device_flops(scheds)[1] * unit
  if name == 'ring':  # device i holds zigzag chunk i of every row and computes its queries
    work = layout.to_zigzag(pairs_per_token(batch), N)
    return work.reshape(work.shape[0], N, -1).sum(axis=(0, 2)) * unit
  work = pairs_per_token(batch)
  return work.reshape(N, -1).sum(-1) * unit


def host_batch(name, c, mesh, batch):
  transform = dca.with_plan(c, mesh, layout.host_layout(c, mesh))
  return transform(batch)


def train_program(c, mesh, batch):
  runtime = make_runtime(c, mesh)
  setup = setup_model(c, mesh, runtime)
  b_sharding = rules_lib.named_sharding((c.batch_size, c.seq_len), ('batch', 'length'),
                                        c.parallelism.rules, mesh, 'batch')
  step = jax.jit(step_lib.make_train_step(setup),
                 in_shardings=(setup.shardings, b_sharding),
                 out_shardings=(setup.shardings, NamedSharding(mesh, P())), donate_argnums=0)
  device_batch = {k: jax.device_put(v, b_sharding) for k, v in batch.items()}
  compiled = step.lower(setup.abstract, device_batch).compile()
  return compiled, runtime, setup, device_batch


def attention_program(c, mesh, batch):
  """One layer's attention, forward + backward, alone (random q/k/v of the model's shapes)."""
  attend = make_attend(c, mesh)
  m = c.model
  q_spec = rules_lib.logical_to_spec(('batch', 'length', 'act_heads', None), c.parallelism.rules,
                                     mesh)
  ids = NamedSharding(mesh, P(q_spec[0], q_spec[1]))
  B, L = c.batch_size, c.seq_len
  qkv = [jax.ShapeDtypeStruct((B, L, h, m.head_dim), np.float32,
                              sharding=NamedSharding(mesh, q_spec))
         for h in (m.num_heads, m.num_kv_heads, m.num_kv_heads)]
  plan = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=ids)
          for k, v in batch.items() if k.startswith(dca.PREFIX)}
  int_arg = jax.ShapeDtypeStruct((B, L), np.int32, sharding=ids)

  def f(q, k, v, seg, pos, plan):
    with dca.use_plan(plan):
      return attend(q, k, v, causal=True, **self_attention_kwargs(seg, pos)).sum()

  return jax.jit(jax.grad(f, (0, 1, 2))).lower(*qkv, int_arg, int_arg, plan).compile()


def all_to_all_kinds(hlo: str) -> tuple[int, int]:
  """(synchronous, asynchronous) all-to-all ops in an optimized HLO module."""
  sync = len(re.findall(r' all-to-all\(', hlo))
  started = len(re.findall(r' all-to-all-start\(|async-start\(.*all-to-all', hlo))
  return sync, started


def schedule_outline(hlo: str, limit: int = 8) -> str:
  """The scheduled order of exchanges and attention loops in the computation holding the most
  all-to-alls, run-length encoded: 'a2a x6, attn x2, a2a x2, ...' (attn = a kernel while loop)."""
  comps, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r'^(ENTRY )?%?([\w.\-]+) .*\{$', line)
    if head and not line.startswith(' '):
      name = head.group(2)
      comps[name] = []
    elif name and (op := re.search(r' (all-to-all(?:-start)?|while)\(', line)):
      comps[name].append('attn' if op.group(1) == 'while' else op.group(1).replace(
          'all-to-all', 'a2a'))
  ops = max(comps.values(), key=lambda v: sum(o.startswith('a2a') for o in v), default=[])
  runs = []
  for o in ops:
    if runs and runs[-1][0] == o:
      runs[-1][1] += 1
    else:
      runs.append([o, 1])
  text = ', '.join(f'{o} x{k}' for o, k in runs[:limit])
  return text + (', ...' if len(runs) > limit else '')


def time_steps(c, compiled, runtime, setup, device_batch, repeats):
  state = init_train_state(c, setup, runtime)
  times, loss = [], float('nan')
  for i in range(repeats + 1):
    t0 = time.perf_counter()
    state, metrics = compiled(state, device_batch)
    loss = float(metrics['loss'])
    if i:
      times.append(time.perf_counter() - t0)
  return float(np.median(times)), min(times), max(times), loss


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--seq_len', type=int, default=1024)
  ap.add_argument('--rows_per_device', type=int, default=2)
  ap.add_argument('--tolerance', type=float, default=0.02)
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--impls', default='dp,ring,dca')
  ap.add_argument('--smoke', action='store_true', help='seconds-long check: seq 128, dca only')
  args = ap.parse_args()
  if args.smoke:
    args.seq_len, args.rows_per_device, args.repeats, args.impls = 128, 2, 1, 'dca'
  B, L = N * args.rows_per_device, args.seq_len
  raw = long_tail_batch(B, L, args.seed, 256)

  print(f'# bench_disaggregation | backend {jax.default_backend()} | {jax.device_count()} x '
        f'{jax.devices()[0].device_kind} | jax {jax.__version__} | float32')
  print(f'# batch: {B} packed rows x {L} tokens, long-tail mix (seed {args.seed}); model 2 layers, '
        'd=128, 4 heads (2 kv), head dim 32, mlp 256, vocab 256, blockwise block 128; dca '
        f'tolerance {args.tolerance}, 2 nano-batches; attention FLOPs = exact causal pairs x 4 H Dh')
  header = (f'{"impl":<5} {"mesh":<18} {"attn flops max/mean":>19} {"attn MiB/l mean (max)":>22} '
            f'{"step MiB":>9} {"mem MiB":>8} {"step s (min-max)":>18} {"loss":>7} '
            f'{"a2a sync/async":>14}')
  print(header)
  print('-' * len(header))
  results = {}
  for name in args.impls.split(','):
    c = bench_config(name, L, B, args.tolerance)
    mesh = mesh_lib.make_mesh(c.mesh)
    t0 = time.perf_counter()
    batch = host_batch(name, c, mesh, raw)
    host_ms = (time.perf_counter() - t0) * 1e3
    flops = flops_per_device(name, raw, c)
    compiled, runtime, setup, device_batch = train_program(c, mesh, batch)
    hlo = compiled.as_text()
    step_bytes = collective_bytes_per_device(hlo, N)
    attn = collective_bytes_per_device(attention_program(c, mesh, batch).as_text(), N)
    mem = perf.compiled_memory_bytes(compiled)
    med, lo, hi, loss = time_steps(c, compiled, runtime, setup, device_batch, args.repeats)
    sync, started = all_to_all_kinds(hlo)
    imb = flops.max() / flops.mean()
    results[name] = (imb, attn.mean(), med, host_ms)
    mesh_name = mesh_lib.describe(mesh).replace('fsdp=1 x ', '').replace(' x tensor=1', '')
    print(f'{name:<5} {mesh_name:<18} '
          f'{imb:>19.3f} {attn.mean() / MiB:>10.2f} ({attn.max() / MiB:>8.2f}) '
          f'{step_bytes.mean() / MiB:>9.1f} {mem / MiB:>8.1f} {med:>6.2f} ({lo:.2f}-{hi:.2f}) '
          f'{loss:>7.4f} {sync:>6}/{started:<7}', flush=True)
    if name == 'dca':
      _, scheds = dca.plan_batch(raw['segment_ids'], raw['positions'], N,
                                 **dca.planner_kwargs(c))
      q_rows = max(dca.pair_rows(s, N)[0].max() for s in scheds)
      kv_rows = max(dca.pair_rows(s, N)[1].max() for s in scheds)
      T = B // N // c.parallelism.dca_nano_batches * L
      cq, ck = dca.capacities(T, c.parallelism.dca_q_capacity, c.parallelism.dca_kv_capacity)
      tasks = sum(len(s.tasks) for s in scheds)
      # What the tasks really need moved (a ragged all_to_all would send only this): forward,
      # per device and layer, Q + K/V rows out and outputs back, float32.
      m = c.model
      payload = np.zeros(N)
      for s in scheds:
        q, kv = dca.pair_rows(s, N)
        payload += (q.sum(1) * m.num_heads * m.head_dim + kv.sum(1) * 2 * m.num_kv_heads *
                    m.head_dim + q.sum(0) * m.num_heads * m.head_dim) * 4
      print(f'#   dca forward payload the plan needs (rows used, not capacity): mean '
            f'{payload.mean() / MiB:.2f} (max {payload.max() / MiB:.2f}) MiB per device and layer;'
            ' the static-capacity all_to_all sends whole buckets', flush=True)
      print(f'#   dca compiled schedule (first exchanges/attention loops in order): '
            f'{schedule_outline(hlo)}')
      print(f'#   dca plan: {tasks} tasks over 2 nano-batches, host planning {host_ms:.0f} ms per '
            f'batch; busiest (source, destination) buffer {q_rows}/{cq} query rows, '
            f'{kv_rows}/{ck} key/value rows (used/capacity)', flush=True)
    del compiled

  parts = []
  if 'dp' in results and 'dca' in results:
    parts.append(f'attention FLOPs max/mean {results["dp"][0]:.3f} (dp packing) -> '
                 f'{results["dca"][0]:.3f} (dca)')
  if 'ring' in results:
    parts.append(f'ring {results["ring"][0]:.3f}')
  if 'dca' in results and 'ring' in results:
    parts.append(f'attention bytes/device/layer dca {results["dca"][1] / MiB:.2f} MiB vs ring '
                 f'{results["ring"][1] / MiB:.2f} MiB')
  if not parts and 'dca' in results:
    parts.append(f'dca attention FLOPs max/mean {results["dca"][0]:.3f}')
  print('summary: ' + '; '.join(parts))


if __name__ == '__main__':
  main()
