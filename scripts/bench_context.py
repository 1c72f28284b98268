"""Context-parallel attention: memory, communication, balance and time per sequence length.

    python scripts/bench_context.py                      # the full table (compile-only rows)
    python scripts/bench_context.py --run_length=131072  # + run one 131K train step on 1 device

For each sequence length x context size (1, 2, 4, 8 devices, one sequence per step) x
implementation, on fake CPU devices, float32, model: 2 layers, d=384, 6 heads (2 kv heads,
head dim 64), SwiGLU 1536, vocab 8192, blockwise attention, chunked loss, parameters sharded
over (fsdp, context). Columns (see docs/measuring.md):
  mem GiB     per-device memory of the compiled train step (memory_analysis: temp + args +
              outputs - aliased); compile only, so long lengths cost no execution
  attn MiB/l  bytes one device sends per layer for attention, forward + backward, from the
              optimized HLO of the attention op alone: collective-permute operand bytes for
              each (source, target) pair the device is a source of, all-gather operand x
              (N - 1), reduce-scatter output x (N - 1), all-reduce 2 (N - 1) / N x buffer; ops
              inside while loops x their known trip count, inside an N-way conditional x 1/N
              (TokenRing's per-step switch takes each branch once); mean (max) over devices
  step MiB    the same count over the whole train step (adds parameter gathers, gradient
              reductions)
  flops max/mean  per-device forward attention FLOPs from the blockwise kernel's block
              schedule in the data layout used (zigzag), and for the contiguous layout
  fwd+bwd s   train-step time, median of 5 after a warm-up (min-max), only for --time_lengths

Then the attention alone at --ratio_length on --ratio_context devices (B=1, 4 heads x 64,
float32, causal, blocks 512, zigzag layout), forward + backward:
  cpu x       process CPU time (time.process_time: all threads of all fake devices) of each
              implementation over the single-device blockwise kernel on the same tokens,
              median of --repeats after a warm-up. The fake devices share the cores, so this
              measures the extra work of splitting, not scaling.
  live        block pairs the per-block kernel computes (its block table: pairs it cannot
              prove fully masked) over all pairs of the L x L score matrix, per implementation

    python scripts/bench_context.py --tiny               # seconds: the ratio table only
    python scripts/bench_context.py --lengths= --json out.json   # the ratio table at 4096
"""

import argparse
import functools
import json
import os
import resource
import sys
import time

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--lengths', default='4096,16384,65536,131072,262144')
  ap.add_argument('--contexts', default='1,2,4,8')
  ap.add_argument('--impls', default='allgather,ring,token_ring')
  ap.add_argument('--time_lengths', default='4096', help='also time these lengths ("" = none)')
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--budget_gib', type=float, default=20.0)
  ap.add_argument('--run_length', type=int, default=0,
                  help='also run one train step at this length on ONE device (slow)')
  ap.add_argument('--search', action='store_true', help='longest length fitting 1 device')
  ap.add_argument('--ratio_length', type=int, default=4096,
                  help='attention-alone CPU-time ratio table at this length (0 = skip)')
  ap.add_argument('--ratio_context', type=int, default=8)
  ap.add_argument('--tiny', action='store_true',
                  help='seconds: only the ratio table, at 512 tokens on 4 devices, block 64')
  ap.add_argument('--json', default='', help='also write the results here')
  ap.add_argument('--smoke', action='store_true',
                  help='seconds-long check: a 1-layer d=32 model at 128 tokens, ring on 2 devices')
  return ap.parse_args(argv)


if __name__ == '__main__':
  parse_args()  # --help and bad arguments answer here, before JAX's ~2 s import

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from configs import base  # noqa: E402
from modeling import blockwise  # noqa: E402
from modeling.attention import KERNELS, self_attention_kwargs  # noqa: E402
from parallelism import mesh as mesh_lib  # noqa: E402
from parallelism import rules as rules_lib  # noqa: E402
from parallelism.context import balance, layout, make_context_attend  # noqa: E402
from training.metrics import perf  # noqa: E402
from training.composition import make_attend  # noqa: E402
from training.program import build_program  # noqa: E402

GiB, MiB = 2 ** 30, 2 ** 20
# The benchmark's model; --smoke shrinks it (and the lengths) to a seconds-long check.
MODEL = dict(num_layers=2, d_model=384, num_heads=6, num_kv_heads=2, head_dim=64, mlp_dim=1536,
             vocab_size=8192)
BLOCK, LOSS_CHUNK = 1024, 4096
SMOKE_MODEL = dict(num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16,
                   mlp_dim=64, vocab_size=256)


def bench_config(seq_len: int, context: int, impl: str, remat: str = 'none'):
  c = base.get_config()
  c.seq_len, c.batch_size, c.steps = seq_len, 1, 10
  c.data.source = 'synthetic'   # batches are made here (random_batch): no bytes-per-token counts
  m = c.model
  m.update(MODEL)
  m.remat = remat
  c.attention.impl = 'blockwise'
  c.attention.block_q = c.attention.block_kv = BLOCK
  c.attention.loss_chunk = LOSS_CHUNK
  c.mesh.data, c.mesh.fsdp, c.mesh.context, c.mesh.tensor = 1, 1, context, 1
  c.parallelism.context_impl = impl if context > 1 else 'none'
  c.parallelism.rules = tuple((n, ('fsdp', 'context')) if n == 'embed' else (n, a)
                              for n, a in c.parallelism.rules)
  return c


# ---------------------------------------------------------------- HLO collective bytes

collective_bytes_per_device = perf.collective_bytes_per_device   # trip-count aware; see perf.py


# ---------------------------------------------------------------- programs

def _mesh(c):
  return mesh_lib.make_mesh(c.mesh, jax.devices()[:c.mesh.context])


def train_step_program(c):
  """The compiled train step (compile only) and its TrainProgram."""
  program = build_program(c, _mesh(c))
  return program.compiled_train_step(), program


def attention_program(c):
  """One layer's attention, forward + backward, alone: its collectives are the attention's."""
  mesh = _mesh(c)
  attend = make_attend(c, mesh)
  m = c.model
  q_spec = rules_lib.logical_to_spec(('batch', 'length', 'act_heads', None),
                                     c.parallelism.rules, mesh)
  ids = NamedSharding(mesh, P(q_spec[0], q_spec[1]))
  shape = lambda h: jax.ShapeDtypeStruct((1, c.seq_len, h, m.head_dim), np.float32,
                                         sharding=NamedSharding(mesh, q_spec))
  int_arg = jax.ShapeDtypeStruct((1, c.seq_len), np.int32, sharding=ids)

  def f(q, k, v, seg, pos):
    return attend(q, k, v, causal=True, **self_attention_kwargs(seg, pos)).sum()

  return jax.jit(jax.grad(f, (0, 1, 2))).lower(
      shape(m.num_heads), shape(m.num_kv_heads), shape(m.num_kv_heads), int_arg,
      int_arg).compile()


def random_batch(c, program):
  r = np.random.RandomState(0)
  L = c.seq_len
  inputs = r.randint(0, c.model.vocab_size, (1, L)).astype(np.int32)
  return program.global_batch({  # zigzag layout when context parallel
      'inputs': inputs, 'targets': np.roll(inputs, -1, 1),
      'segment_ids': np.ones((1, L), np.int32), 'positions': np.arange(L, dtype=np.int32)[None]})


def time_step(c, compiled, program, repeats: int, warmup: bool = True):
  """(median, min, max) seconds of `repeats` steps after an untimed warm-up, and the loss."""
  state = program.init_state()
  batch = random_batch(c, program)
  times = []
  for i in range(repeats + int(warmup)):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    if i or not warmup:
      times.append(time.perf_counter() - t0)
  return float(np.median(times)), min(times), max(times), float(metrics['loss'])


def flops_balance(c, zigzag: bool) -> float:
  n, L = c.mesh.context, c.seq_len
  if n == 1:
    return 1.0
  pos = np.arange(L)[None]
  pos = layout.to_zigzag(pos, n) if zigzag else pos
  owner = 'key' if c.parallelism.context_impl == 'token_ring' else 'query'
  return balance.imbalance(balance.attention_flops(
      np.ones((1, L), np.int32), pos, n, heads=c.model.num_heads, head_dim=c.model.head_dim,
      block=c.attention.block_q, owner=owner))


# ---------------------------------------------------------------- attention alone: CPU-time ratio

RATIO_HEADS, RATIO_HEAD_DIM, RATIO_BLOCK = 4, 64, 512


def _live_pairs(q_ids, kv_ids, bq: int, bk: int) -> int:
  """Block pairs the kernel computes for these queries x keys (its own block table)."""
  (qseg, qpos), (kseg, kpos) = q_ids, kv_ids
  return int(np.asarray(blockwise.block_table(qseg, kseg, qpos, kpos, causal=True, window=0,
                                              block_q=bq, block_kv=bk)).sum())


def live_fraction(impl: str, L: int, n: int, block: int = RATIO_BLOCK) -> float:
  """Computed block area over the L x L scores, following each implementation's schedule
  (tiles fitted to the zigzag chunk as the implementations fit them)."""
  seg, pos = np.ones((1, L), np.int32), np.arange(L, dtype=np.int32)[None]
  if impl == 'blockwise':
    b = blockwise.fit_block(L, block, 'block')
    return _live_pairs((seg, pos), (seg, pos), b, b) * b * b / L ** 2
  pos = layout.to_zigzag(pos, n)
  T = L // n
  b = blockwise.fit_block(T // 2, block, 'block')
  shard = lambda i, sl=slice(None): (seg[:, i * T:(i + 1) * T][:, sl], pos[:, i * T:(i + 1) * T][:, sl])
  front, back = slice(0, T // 2), slice(T // 2, T)
  pairs = 0
  for j in range(n):
    if impl == 'allgather':
      pairs += _live_pairs(shard(j), (seg, pos), b, b)
    elif impl == 'ring':
      pairs += sum(_live_pairs(shard(j), shard((j - s) % n), b, b) for s in range(n))
    elif impl == 'token_ring':  # device j computes for owner (j + s) mod n, on its own K/V
      pairs += _live_pairs(shard(j), shard(j), b, b)
      for s in range(1, n):
        owner = (j + s) % n
        pairs += _live_pairs(shard(owner, back), shard(j, front), b, b)
        ahead = j + s < n
        pairs += _live_pairs(shard(owner, front if ahead else back),
                             shard(j, front if ahead else back), b, b)
    else:
      raise ValueError(impl)
  return pairs * b * b / L ** 2


def _cpu_time(fn, args, repeats: int):
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    t0 = time.process_time()
    jax.block_until_ready(fn(*args))
    times.append(time.process_time() - t0)
  return float(np.median(times)), min(times), max(times)


def attention_ratios(L: int, n: int, impls, repeats: int, block: int = RATIO_BLOCK):
  """[(impl, median s, min, max, ratio vs single-device blockwise, live fraction)]."""
  r = np.random.RandomState(0)
  H, D = RATIO_HEADS, RATIO_HEAD_DIM
  q, k, v = (r.randn(1, L, H, D).astype(np.float32) for _ in range(3))
  seg, pos = np.ones((1, L), np.int32), np.arange(L, dtype=np.int32)[None]

  def grad_fn(attend):
    loss = lambda q, k, v, s, p: attend(q, k, v, causal=True,
                                        **self_attention_kwargs(s, p)).sum()
    return jax.jit(jax.grad(loss, (0, 1, 2)))

  single = functools.partial(KERNELS['blockwise'], block_q=block, block_kv=block)
  base_t = _cpu_time(grad_fn(single), (q, k, v, seg, pos), repeats)
  rows = [('blockwise', *base_t, 1.0, live_fraction('blockwise', L, n, block))]
  for impl in impls:
    c = base.get_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.context, c.mesh.tensor = 1, 1, n, 1
    c.parallelism.context_impl = impl
    c.attention.block_q = c.attention.block_kv = block
    attend = make_context_attend(c, mesh_lib.make_mesh(c.mesh, jax.devices()[:n]))
    t = _cpu_time(grad_fn(attend), tuple(layout.to_zigzag(x, n) for x in (q, k, v, seg, pos)),
                  repeats)
    rows.append((impl, *t, t[0] / base_t[0], live_fraction(impl, L, n, block)))
  return rows


def print_ratios(rows, L, n, repeats):
  print(f'# attention alone, L={L}, context={n}, B=1, {RATIO_HEADS} heads x {RATIO_HEAD_DIM}, '
        f'float32, causal, zigzag, fwd+bwd, process CPU time, median of {repeats}')
  print(f'{"impl":<11} {"cpu s (min-max)":>22} {"cpu x":>6} {"live":>6}')
  for impl, med, lo, hi, ratio, live in rows:
    print(f'{impl:<11} {f"{med:.3f} ({lo:.3f}-{hi:.3f})":>22} {ratio:>6.3f} {live:>6.3f}',
          flush=True)


# ---------------------------------------------------------------- main

def main():
  args = parse_args()
  if args.tiny:
    args.lengths, args.ratio_length, args.ratio_context, args.repeats = '', 512, 4, 2
  if args.smoke:
    global BLOCK, LOSS_CHUNK
    MODEL.update(SMOKE_MODEL)
    BLOCK, LOSS_CHUNK = 64, 0
    args.lengths, args.contexts, args.impls, args.time_lengths = '128', '1,2', 'ring', '128'
    args.repeats, args.search, args.run_length, args.ratio_length = 1, False, 0, 0
  lengths = [int(x) for x in args.lengths.split(',') if x]
  contexts = [int(x) for x in args.contexts.split(',')]
  impls = args.impls.split(',')
  timed = {int(x) for x in args.time_lengths.split(',') if x}

  print(f'# bench_context | backend {jax.default_backend()} | {jax.device_count()} x '
        f'{jax.devices()[0].device_kind} | jax {jax.__version__} | float32')
  out = {'rows': [], 'ratios': []}
  ratio_note = ''
  if args.ratio_length:
    rows = attention_ratios(args.ratio_length, args.ratio_context, impls, args.repeats,
                            block=64 if args.tiny else RATIO_BLOCK)
    print_ratios(rows, args.ratio_length, args.ratio_context, args.repeats)
    out['ratios'] = [dict(zip(('impl', 'cpu_s', 'cpu_s_min', 'cpu_s_max', 'ratio', 'live'), r))
                     for r in rows]
    ratio_note = (f'cpu x vs 1-device blockwise at L={args.ratio_length}, context='
                  f'{args.ratio_context}: ' + ', '.join(f'{r[0]} {r[4]:.3f} (live {r[5]:.2f})'
                                                        for r in rows[1:]))
  if not lengths:
    print('summary: ' + ratio_note)
    if args.json:
      with open(args.json, 'w') as f:
        json.dump(out, f, indent=1)
    return
  print('# model: 2 layers, d=384, 6 heads (2 kv), head dim 64, mlp 1536, vocab 8192, remat=none,'
        ' batch 1 sequence, blockwise attention (block 1024), loss_chunk 4096, params over '
        '(fsdp, context), zigzag layout for context > 1; causal attention FLOPs')
  header = (f'{"seq_len":>8} {"ctx":>3} {"impl":<10} {"mem GiB":>8} {"vs 1 dev":>8} '
            f'{"attn MiB/l mean (max)":>22} {"step MiB":>9} {"flops max/mean":>14} '
            f'{"contig.":>7} {"fwd+bwd s (min-max)":>22}')
  print(header)
  print('-' * len(header))
  single_mem, results = {}, []
  for L in lengths:
    for n in contexts:
      for impl in (['none'] if n == 1 else impls):
        c = bench_config(L, n, impl)
        compiled, ctx = train_step_program(c)
        mem = perf.compiled_memory_bytes(compiled)
        if n == 1:
          single_mem[L] = mem
        step_bytes = collective_bytes_per_device(compiled.as_text(), n)
        attn = collective_bytes_per_device(attention_program(c).as_text(), n)
        timing = ''
        if L in timed:
          med, lo, hi, _ = time_step(c, compiled, ctx, args.repeats)
          timing = f'{med:.2f} ({lo:.2f}-{hi:.2f})'
        ratio = mem / single_mem[L] if L in single_mem else float('nan')
        zig, contiguous = flops_balance(c, True), flops_balance(c, False)
        results.append((L, n, impl, mem, ratio, zig, contiguous))
        out['rows'].append(dict(seq_len=L, context=n, impl=impl, mem_bytes=mem, mem_ratio=ratio,
                                attn_bytes_mean=float(attn.mean()), step_bytes_mean=float(
                                    step_bytes.mean()), flops_imbalance=zig, timing=timing))
        print(f'{L:>8} {n:>3} {impl:<10} {mem / GiB:>8.3f} {ratio:>8.3f} '
              f'{attn.mean() / MiB:>10.2f} ({attn.max() / MiB:>8.2f}) '
              f'{step_bytes.mean() / MiB:>9.1f} {zig:>14.3f} {contiguous:>7.3f} {timing:>22}',
              flush=True)
        del compiled, ctx

  longest = None
  if args.search:
    L, fits = lengths[-1], []
    while True:
      mem = perf.compiled_memory_bytes(train_step_program(bench_config(L, 1, 'none'))[0])
      print(f'# 1 device, seq_len {L}: {mem / GiB:.2f} GiB '
            f'({"fits" if mem <= args.budget_gib * GiB else "over"} {args.budget_gib:g} GiB)',
            flush=True)
      if mem > args.budget_gib * GiB:
        break
      fits.append(L)
      L *= 2
    lo, hi = (fits[-1] if fits else 0), L
    while hi - lo > 16384:
      mid = (lo + hi) // 2 // 16384 * 16384
      mem = perf.compiled_memory_bytes(train_step_program(bench_config(mid, 1, 'none'))[0])
      print(f'# 1 device, seq_len {mid}: {mem / GiB:.2f} GiB', flush=True)
      lo, hi = (mid, hi) if mem <= args.budget_gib * GiB else (lo, mid)
    longest = lo
    print(f'# longest sequence whose train step fits {args.budget_gib:g} GiB on one device: '
          f'{longest:,} tokens (16K granularity)')

  run_note = ''
  if args.run_length:
    c = bench_config(args.run_length, 1, 'none')
    t0 = time.perf_counter()
    compiled, ctx = train_step_program(c)
    compile_s = time.perf_counter() - t0
    mem = perf.compiled_memory_bytes(compiled)
    med, _, _, loss = time_step(c, compiled, ctx, repeats=1, warmup=False)  # compiled already
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    run_note = (f'{args.run_length:,}-token train step on 1 CPU device: compiled {mem / GiB:.2f} '
                f'GiB, process peak RSS {rss:.2f} GiB, compile {compile_s:.0f} s, step '
                f'{med:.0f} s, loss {loss:.3f}')
    print('# ' + run_note, flush=True)

  last = max(r[0] for r in results)
  best8 = [r for r in results if r[0] == last and r[1] == max(contexts)]
  worst_zig = max(r[5] for r in results if r[1] > 1) if len(contexts) > 1 else 1.0
  contig = max(r[6] for r in results if r[1] > 1) if len(contexts) > 1 else 1.0
  print(f'summary: at {last:,} tokens, context={max(contexts)} per-device memory / 1 device = '
        + ', '.join(f'{r[2]} {r[4]:.3f}' for r in best8)
        + f' | flops max/mean zigzag <= {worst_zig:.3f} (contiguous up to {contig:.3f})'
        + (f' | longest 1-device fit {longest:,}' if longest else '')
        + (f' | {run_note}' if run_note else '') + (f' | {ratio_note}' if ratio_note else ''))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=1)


if __name__ == '__main__':
  from training.safety.errors import run_cli
  run_cli(main)
