"""Core-attention disaggregation vs data parallelism with packing vs ring context parallelism.

    python scripts/bench_disaggregation.py --seq_len=2048         # the issue's long-tail mix
    python scripts/bench_disaggregation.py --seq_len=2048 --dist=pareto   # or lognormal,
    python scripts/bench_disaggregation.py --lengths_from=DIR      # or real ArrayRecord lengths
    python scripts/bench_disaggregation.py --seq_len=512 --json rows.json

One packed batch of long-tail document lengths (--dist: the default mix of a few documents of
half to a whole row and many short ones, Pareto, lognormal, or real lengths drawn from an
ArrayRecord index), first-fit packed in drawing order, padding at row ends, on 8 fake CPU
devices, float32, model: 2 layers,
d=128, 4 heads (2 kv), head dim 32, SwiGLU 256, vocab 256, blockwise attention (block 128).
Rows: dp = data parallelism, 8 devices, packed rows as they come; ring = ring attention over
context=8 (zigzag) on the same rows; dca = disaggregated, data=8, planned per batch
(parallelism/disaggregation.py, tolerance --tolerance, 2 nano-batches, layer ping-pong).
Columns (what executed next to what is modelled):
  exec max/mean  per-device attention work the blockwise kernel executes: (query block, key
              block) pairs it cannot prove masked (`block_table`, the kernel's own skip test)
              x block area, summed over its kernel calls as they run: dp's two rows share one
              table per call, ring's rows one per ring step, dca per row (own rows with moved
              blocks dead + the received blocks); forward, per layer
  exec/dp     mean executed work / dp's (dp as run; dca's planner keeps dp-with-per-row-tables'
              total, reported as `exec/dp_row`)
  model max/mean  exact causal query-key pairs of documents per device (the paper's FLOPs)
  attn MiB/l  bytes one device sends for one layer's attention, forward + backward, mean (max):
              ring from the optimized HLO (collective-permute x trip count); dca from the plan's
              ragged-exchange trip counts (the chunks that travel: queries out, K/V out,
              outputs back, and the same again in the backward); `payload` = the rows the
              plan needs; sent/payload is 1 when only planned rows travel
  step s      median train-step wall time over --repeats after a warm-up (min-max), and
              process CPU seconds per step; noisy: the 8 fake devices share this machine
  schedule    dca: the order of the layer's ping-pong stages (named scopes) in the traced
              program, and the order XLA's scheduler gave the exchange and kernel loops
"""

import argparse
import json
import os
import re
import sys
import time

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--seq_len', type=int, default=1024)
  ap.add_argument('--rows_per_device', type=int, default=2)
  ap.add_argument('--tolerance', type=float, default=0.02)
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--impls', default='dp,ring,dca')
  ap.add_argument('--dist', default='mix', help='document lengths: mix | pareto | lognormal')
  ap.add_argument('--scale', type=float, default=0.0,
                  help='pareto: minimum (default 32); lognormal: median (default 96)')
  ap.add_argument('--shape', type=float, default=0.0,
                  help='pareto: alpha (default 1.2); lognormal: sigma (default 1.3)')
  ap.add_argument('--lengths_from', default='',
                  help='a prepared ArrayRecord directory: draw real document lengths from its '
                       'index (training.data.sources.load_document_lengths)')
  ap.add_argument('--json', help='write the rows (and the batch description) to this path')
  ap.add_argument('--smoke', action='store_true', help='seconds-long check: seq 128, dca only')
  return ap.parse_args(argv)


if __name__ == '__main__':
  parse_args()  # --help and bad arguments answer here, before JAX's ~2 s import

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from configs import base  # noqa: E402
from modeling import blockwise  # noqa: E402
from modeling.runtime import self_attention_kwargs  # noqa: E402
from parallelism import disaggregation as dca  # noqa: E402
from parallelism import mesh as mesh_lib  # noqa: E402
from parallelism import rules as rules_lib  # noqa: E402
from parallelism.context import layout  # noqa: E402
from training.metrics.perf import collective_bytes_per_device  # noqa: E402
from training.metrics import perf  # noqa: E402
from training import step as step_lib  # noqa: E402
from training.composition import make_attend, make_runtime  # noqa: E402
from training.data import sources  # noqa: E402
from training.state import init_train_state, setup_model  # noqa: E402

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


def length_sampler(dist: str, L: int, scale: float, shape: float, lengths=None):
  """Document lengths (r -> int, 2..L): 'mix' = 10% L/2..L tokens, the rest 8..L/8;
  'pareto' = ceil(scale x (1 + Lomax(shape))); 'lognormal' = median scale, sigma shape;
  'lengths' = drawn from the given real document lengths; all capped at L."""
  def cap(n):
    return int(min(max(n, 2), L))
  if dist == 'mix':
    return lambda r: r.randint(L // 2, L + 1) if r.rand() < 0.1 else r.randint(8, L // 8 + 1)
  if dist == 'pareto':
    return lambda r: cap(np.ceil(scale * (1 + r.pareto(shape))))
  if dist == 'lognormal':
    return lambda r: cap(np.ceil(r.lognormal(np.log(scale), shape)))
  if dist == 'lengths':
    return lambda r: cap(lengths[r.randint(len(lengths))])
  raise ValueError(f'--dist={dist!r}; valid: mix, pareto, lognormal (or --lengths_from)')


def long_tail_batch(B: int, L: int, seed: int, vocab: int, sample=None):
  """First-fit packed rows of documents drawn from `sample` (default: the 'mix' long tail),
  in drawing order, until 200 draws in a row fit nowhere."""
  r = np.random.RandomState(seed)
  sample = sample or length_sampler('mix', L, 0, 0)
  rows = [[] for _ in range(B)]
  free = np.full(B, L)
  misses = 0
  while misses < 200:
    n = sample(r)
    fits = np.nonzero(free >= n)[0]
    if not len(fits):
      misses += 1
      continue
    misses = 0
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
  return dca.causal_pairs(batch['segment_ids'], batch['positions'])


def modelled_pairs(name, batch, scheds):
  """Exact causal query-key pairs each device computes (forward, per layer)."""
  if name == 'dca':
    return dca.device_flops(scheds)[1].astype(np.float64)
  if name == 'ring':  # device i holds zigzag chunk i of every row and computes its queries
    work = layout.to_zigzag(pairs_per_token(batch), N)
    return work.reshape(work.shape[0], N, -1).sum(axis=(0, 2)).astype(np.float64)
  return pairs_per_token(batch).reshape(N, -1).sum(-1).astype(np.float64)


def executed_entries(name, batch, scheds, block):
  """Query-key entries the blockwise kernel computes per device (live block pairs x area)."""
  seg, pos = batch['segment_ids'], batch['positions']
  B, L = seg.shape
  if name == 'dca':
    return dca.device_work(scheds)[1] * float(scheds[0].block_q * scheds[0].block_kv)
  if name == 'ring':
    zseg, zpos = layout.to_zigzag(seg, N), layout.to_zigzag(pos, N)
    b = blockwise.fit_block(L // (2 * N), block, 'block')
    live = blockwise.block_table(zseg, zseg, zpos, zpos, causal=True, window=0, block_q=b,
                                 block_kv=b, per_row=True, xp=np)
    nq = live.shape[1] // N                       # query blocks per device
    per = L // N // b                             # key blocks per ring step (one device's chunk)
    out = np.zeros(N)
    for i in range(N):       # each ring step is one kernel call over all B rows: shared table
      rows = live[:, i * nq:(i + 1) * nq]
      for j in range(N):
        out[i] += rows[:, :, j * per:(j + 1) * per].any(0).sum() * B
    return out * b * b
  b = blockwise.fit_block(L, block, 'block')
  R = B // N
  live = blockwise.block_table(seg, seg, pos, pos, causal=True, window=0, block_q=b,
                               block_kv=b, per_row=True, xp=np).reshape(N, R, L // b, L // b)
  shared = live.any(1).sum(axis=(1, 2)) * R       # one kernel call over the device's rows
  return shared * float(b * b), live.sum(axis=(1, 2, 3)) * float(b * b)


STAGE = re.compile(r'dca_(pre|dispatch|compute|finish|post)_(\d+)')


def traced_outline(lowered_text: str) -> str:
  """The forward ping-pong stages of one layer in the traced program (StableHLO with debug
  locations), in order: each stage's first op, until the last nano-batch's post."""
  seq = []
  for line in lowered_text.splitlines():
    hit = STAGE.findall(line)
    if hit and 'transpose' not in line:
      stage = f'{hit[-1][0]}{hit[-1][1]}'
      if not seq or seq[-1] != stage:
        seq.append(stage)
      if stage == 'post1':
        break
  return ' '.join(seq)


def compiled_outline(hlo: str, limit: int = 8) -> str:
  """The forward exchange and kernel loops of one layer in the compiled, scheduled HLO."""
  comps, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r'^(ENTRY )?%?([\w.\-]+) .*\{$', line)
    if head and not line.startswith(' '):
      name = head.group(2)
      comps[name] = []
    elif name and re.search(r'[)\]] while\(', line) and 'transpose' not in line:
      hit = STAGE.findall(line)
      if hit:
        comps[name].append(f'{hit[-1][0]}{hit[-1][1]}')
  ops = max(comps.values(), key=len, default=[])
  runs = []
  for o in ops:
    if not runs or runs[-1] != o:
      runs.append(o)
  return ' '.join(runs[:limit])


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
  lowered = step.lower(setup.abstract, device_batch)
  compiled = lowered.compile()
  compiled.traced_text = (lowered.as_text(debug_info=True)
                          if c.parallelism.context_impl == 'disaggregated' else '')
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
    return attend(q, k, v, causal=True,
                  **self_attention_kwargs(seg, pos, dca.plan_of(plan))).sum()

  return jax.jit(jax.grad(f, (0, 1, 2))).lower(*qkv, int_arg, int_arg, plan).compile()


def time_steps(c, compiled, runtime, setup, device_batch, repeats):
  state = init_train_state(c, setup, runtime)
  times, cpu, loss = [], [], float('nan')
  for i in range(repeats + 1):
    t0, c0 = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, device_batch)
    loss = float(metrics['loss'])
    if i:
      times.append(time.perf_counter() - t0)
      cpu.append(time.process_time() - c0)
  return float(np.median(times)), min(times), max(times), float(np.median(cpu)), loss


def main():
  args = parse_args()
  if args.smoke:
    args.seq_len, args.rows_per_device, args.repeats, args.impls = 128, 2, 1, 'dca'
  B, L = N * args.rows_per_device, args.seq_len
  dist = 'lengths' if args.lengths_from else args.dist
  scale = args.scale or {'pareto': 32.0, 'lognormal': 96.0}.get(dist, 0.0)
  shape = args.shape or {'pareto': 1.2, 'lognormal': 1.3}.get(dist, 0.0)
  lengths = sources.load_document_lengths(args.lengths_from) if args.lengths_from else None
  raw = long_tail_batch(B, L, args.seed, 256,
                        length_sampler(dist, L, scale, shape, lengths))
  docs = np.array([(row[row > 0].max() if (row > 0).any() else 0) for row in raw['segment_ids']])
  described = {'mix': 'long-tail mix (10% L/2..L, the rest 8..L/8)',
               'pareto': f'Pareto lengths {scale:g} x (1 + Lomax({shape:g}))',
               'lognormal': f'lognormal lengths (median {scale:g}, sigma {shape:g})',
               'lengths': f'real lengths from {args.lengths_from}'}[dist]
  block = 128

  print(f'# bench_disaggregation | backend {jax.default_backend()} | {jax.device_count()} x '
        f'{jax.devices()[0].device_kind} | jax {jax.__version__} | float32')
  print(f'# batch: {B} packed rows x {L} tokens, {described}, capped at {L}, {docs.sum()} '
        f'documents (seed {args.seed}); model 2 layers, '
        f'd=128, 4 heads (2 kv), head dim 32, mlp 256, vocab 256, blockwise block {block}; dca '
        f'tolerance {args.tolerance}, 2 nano-batches, layer ping-pong')
  header = (f'{"impl":<5} {"mesh":<18} {"exec max/mean":>13} {"exec/dp":>8} '
            f'{"model max/mean":>14} {"attn MiB/l mean (max)":>22} {"sent/payload":>12} '
            f'{"mem MiB":>8} {"step s (min-max)":>18} {"cpu s":>6} {"loss":>7}')
  print(header)
  print('-' * len(header))
  rows, dp_exec = [], None
  for name in args.impls.split(','):
    c = bench_config(name, L, B, args.tolerance)
    mesh = mesh_lib.make_mesh(c.mesh)
    t0 = time.perf_counter()
    batch = host_batch(name, c, mesh, raw)
    host_ms = (time.perf_counter() - t0) * 1e3
    scheds = None
    if name == 'dca':
      _, scheds = dca.plan_batch(raw['segment_ids'], raw['positions'], N,
                                 **dca.planner_kwargs(c))
    model = modelled_pairs(name, raw, scheds)
    executed = executed_entries(name, raw, scheds, block)
    exec_row = None
    if name == 'dp':
      executed, exec_row = executed
      dp_exec = (executed.mean(), exec_row.mean())
    compiled, runtime, setup, device_batch = train_program(c, mesh, batch)
    hlo = compiled.as_text()
    mem = perf.compiled_memory_bytes(compiled)
    if name == 'dca':
      q_row, kv_row = dca.row_bytes(c)
      sent = 2 * dca.exchange_bytes(scheds, q_row, kv_row)['per_device']  # fwd + bwd
      payload = sent.copy()   # ragged: the chunks sent are exactly the planned rows
    else:
      sent = collective_bytes_per_device(attention_program(c, mesh, batch).as_text(), N)
      payload = sent
    med, lo, hi, cpu, loss = time_steps(c, compiled, runtime, setup, device_batch, args.repeats)
    row = {'impl': name, 'mesh': mesh_lib.describe(mesh),
           'exec_max_over_mean': float(executed.max() / executed.mean()),
           'exec_mean_entries': float(executed.mean()),
           'exec_over_dp': float(executed.mean() / dp_exec[0]) if dp_exec else None,
           'exec_over_dp_row': float(executed.mean() / dp_exec[1]) if dp_exec else None,
           'model_max_over_mean': float(model.max() / model.mean()),
           'attn_bytes_per_layer_mean': float(sent.mean()),
           'attn_bytes_per_layer_max': float(sent.max()),
           'sent_over_payload': float(sent.sum() / payload.sum()) if payload.sum() else None,
           'mem_bytes': int(mem), 'step_s_median': med, 'step_s_min': lo, 'step_s_max': hi,
           'step_cpu_s': cpu, 'loss': loss, 'host_plan_ms': host_ms}
    if name == 'dca':
      row.update({'moved_query_blocks': int(sum(s.q_blocks.sum() for s in scheds)),
                  'moved_kv_blocks': int(sum(s.kv_blocks.sum() for s in scheds)),
                  'schedule_traced': traced_outline(compiled.traced_text),
                  'schedule_compiled': compiled_outline(hlo),
                  'exec_max_over_mean_before': float(
                      dca.device_work(scheds)[0].max() / dca.device_work(scheds)[0].mean())})
    rows.append(row)
    mesh_name = row['mesh'].replace('fsdp=1 x ', '').replace(' x tensor=1', '')
    ratio = '-' if row['sent_over_payload'] is None else f'{row["sent_over_payload"]:.2f}'
    rel = '-' if row['exec_over_dp'] is None else f'{row["exec_over_dp"]:.3f}'
    print(f'{name:<5} {mesh_name:<18} {row["exec_max_over_mean"]:>13.3f} {rel:>8} '
          f'{row["model_max_over_mean"]:>14.3f} {sent.mean() / MiB:>10.2f} ({sent.max() / MiB:>8.2f}) '
          f'{ratio:>12} {mem / MiB:>8.1f} {med:>6.2f} ({lo:.2f}-{hi:.2f}) {cpu:>6.2f} '
          f'{loss:>7.4f}', flush=True)
    if name == 'dca':
      print(f'#   dca plan: {row["moved_query_blocks"]} query blocks and {row["moved_kv_blocks"]} '
            f'key/value blocks moved over 2 nano-batches; executed max/mean without moving '
            f'{row["exec_max_over_mean_before"]:.3f}; exec/dp_row {row["exec_over_dp_row"]}; '
            f'host planning {host_ms:.0f} ms per batch')
      print(f'#   dca layer schedule, traced program (forward stages): {row["schedule_traced"]}')
      print(f'#   dca layer schedule, compiled XLA:{jax.default_backend()} (exchange and kernel '
            f'loops): {row["schedule_compiled"]}', flush=True)
    del compiled

  by = {r['impl']: r for r in rows}
  parts = []
  if 'dca' in by:
    parts.append(f'dca executed max/mean {by["dca"]["exec_max_over_mean"]:.3f}')
    if by['dca']['exec_over_dp'] is not None:
      parts.append(f'executed work {by["dca"]["exec_over_dp"]:.3f}x dp')
  if 'dp' in by:
    parts.append(f'dp executed max/mean {by["dp"]["exec_max_over_mean"]:.3f}')
  if 'ring' in by:
    parts.append(f'ring {by["ring"]["exec_max_over_mean"]:.3f}')
  if 'dca' in by and 'ring' in by:
    parts.append(f'attention MiB/device/layer dca {by["dca"]["attn_bytes_per_layer_mean"] / MiB:.2f}'
                 f' vs ring {by["ring"]["attn_bytes_per_layer_mean"] / MiB:.2f}')
  print('summary: ' + '; '.join(parts))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'bench': 'bench_disaggregation', 'seq_len': L, 'dist': described,
                 'rows_per_device':
                 args.rows_per_device, 'seed': args.seed, 'backend': jax.default_backend(),
                 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  from training.safety.errors import run_cli
  run_cli(main)
