"""The one-shot accelerator benchmark: model MFU, attention kernels, ring overhead, overlap.

    python scripts/bench_gpu.py --json $OUT/bench_gpu.json      # one GPU: < 8 minutes
    python scripts/bench_gpu.py --tiny                           # CPU smoke run (CI runs it):
                                                               # tiny shapes, 4 fake devices,
                                                               # no 32K, ring@1, TokenRing rows

Nothing is downloaded: random tokens, random weights. One table, rows:
  peak        bf16 matmul FLOP/s measured in this run (8192^3; float32 256^3 with --tiny):
              the MFU denominator (../shared convention: MEASURING.md)
  model 8K    dense ~1B transformer (16 layers, d=2048, 16 heads x 128, 4 kv heads, SwiGLU
              5632, vocab 32,000), one 8,192-token sequence per step, bf16 compute, float32
              params, attention.impl=--model_impl: tokens/s, MFU (model FLOPs = 3 x forward,
              causal attention counts half the pairs), compiled step memory
  model 32K   the same at 32,768 tokens with model.remat=full
  attn        attention alone at 16,384 tokens, head dim 128, 16 heads (4 kv), causal, bf16,
              per attention.impl: forward and forward+backward TFLOP/s (forward = 2 L^2 H D
              causal FLOPs; backward counted as 2.5 x forward)
  ring@1      ring and all-gather context parallelism over a context axis of one device,
              fwd+bwd time / the same per-block kernel alone (the ring's own overhead)
  ring@N      where N > 1 devices exist: ring, token_ring, all-gather over all of them
  async       collective-permute-start/done pairs (async) vs synchronous collective-permutes
              in the compiled ring and TokenRing programs (context = N)
  peak mem    device peak bytes in use (GPU) or the largest compiled program (CPU)
A row that fails prints FAILED and the error's first line; the rest still run (a failed model
row is rerun with --fallback_impl). Rows still to come after --budget_s are skipped, so one
run fits a 15-minute device lease with its start-up.
"""

import argparse
import functools
import json
import os
import sys
import time
import traceback

if '--tiny' in sys.argv:  # a context axis to exercise on CPU (affects only the CPU platform)
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=4').strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--tiny', action='store_true', help='CPU-sized shapes; runs in seconds')
  ap.add_argument('--json', default='', help='also write the rows here')
  ap.add_argument('--steps', type=int, default=5, help='timed repeats per row (median)')
  ap.add_argument('--model_impl', default='auto', help='attention.impl of the model rows')
  ap.add_argument('--fallback_impl', default='jax_nn',
                  help='rerun a failed model row with this attention.impl ("" = no rerun)')
  ap.add_argument('--budget_s', type=float, default=420.0,
                  help='skip the rows still to come once this many seconds have passed')
  ap.add_argument('--attn_impls', default='xla,jax_nn,blockwise,pallas')
  ap.add_argument('--skip', default='', help='comma list of rows to skip: model,attn,ring,async')
  return ap.parse_args(argv)


if __name__ == '__main__':
  parse_args()  # --help and bad arguments answer here, before JAX's ~2 s import

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from modeling import kernels  # noqa: E402
from modeling.attention import KERNELS, TILED, self_attention_kwargs  # noqa: E402
from parallelism import mesh as mesh_lib  # noqa: E402
from parallelism.context import layout, make_context_attend  # noqa: E402
from parallelism.context.overlap import Program  # noqa: E402
from training import perf  # noqa: E402
from training.composition import make_block_kernel, resolve_attention_impl  # noqa: E402
from training.program import build_program  # noqa: E402

FULL = dict(layers=16, d=2048, heads=16, kv=4, head_dim=128, mlp=5632, vocab=32000, seq=8192,
            long_seq=32768, attn_len=16384, dtype='bfloat16', peak_n=8192, block=128)
TINY = dict(layers=1, d=32, heads=4, kv=2, head_dim=8, mlp=64, vocab=128, seq=128,
            long_seq=256, attn_len=128, dtype='float32', peak_n=256, block=32)
GiB = 2 ** 30


class Table:
  def __init__(self):
    self.rows, self.json = [], []
    self.t0 = time.perf_counter()

  def add(self, what: str, setting: str, result: str, **data):
    at = time.perf_counter() - self.t0  # seconds into the run: the 8-minute budget
    self.rows.append((what, setting, result))
    self.json.append(dict(what=what, setting=setting, result=result, at_s=at, **data))
    print(f'{at:>5.0f}s {what:<10} {setting:<44} {result}', flush=True)

  def failed(self, what: str, setting: str, err: BaseException):
    line = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    self.add(what, setting, f'FAILED: {type(err).__name__}: {line}', error=traceback.format_exc())


def _one_device_mesh(c):
  c.mesh.data = c.mesh.fsdp = c.mesh.context = c.mesh.tensor = 1
  return mesh_lib.make_mesh(c.mesh, jax.devices()[:1])


def model_config(s: dict, seq: int, remat: str, impl: str):
  c = base.get_config()
  c.seq_len, c.batch_size, c.steps = seq, 1, 10
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads = s['layers'], s['d'], s['heads'], s['kv']
  m.head_dim, m.mlp_dim, m.vocab_size = s['head_dim'], s['mlp'], s['vocab']
  m.dtype, m.param_dtype, m.remat, m.scan_layers = s['dtype'], 'float32', remat, True
  c.attention.impl = impl
  c.attention.block_q = c.attention.block_kv = min(s['block'] * 4, seq)  # pallas caps at 128
  return c


def bench_model(table: Table, s: dict, seq: int, remat: str, impl: str, peak: float,
                steps: int):
  c = model_config(s, seq, remat, impl)
  mesh = _one_device_mesh(c)
  setting = f'seq {seq:,}, remat {remat}, attention {impl}->{resolve_attention_impl(c, mesh)}'
  try:
    program = build_program(c, mesh)
    t0 = time.perf_counter()
    compiled = program.compiled_train_step()
    compile_s = time.perf_counter() - t0
    r = np.random.RandomState(0)
    inputs = r.randint(0, c.model.vocab_size, (1, seq)).astype(np.int32)
    batch = program.global_batch({'inputs': inputs, 'targets': np.roll(inputs, -1, 1),
                                  'segment_ids': np.ones((1, seq), np.int32),
                                  'positions': np.arange(seq, dtype=np.int32)[None]})
    holder = {'state': program.init_state()}

    def one_step():
      holder['state'], metrics = compiled(holder['state'], batch)
      jax.block_until_ready(metrics)

    t = perf.time_call(one_step, repeats=steps)
    tps = seq / t['median']
    causal = perf.train_flops_per_token(c.model, seq, causal=True)
    full = perf.train_flops_per_token(c.model, seq, causal=False)
    mem = perf.compiled_memory_bytes(compiled)
    table.add(f'model {seq:,}', setting,
              f'{tps:,.0f} tok/s | MFU {tps * causal / peak:.1%} causal ({tps * full / peak:.1%}'
              f' full) | step {t["median"] * 1e3:.1f} ms | mem {mem / GiB:.2f} GiB | compile '
              f'{compile_s:.0f} s', tokens_per_s=tps, mfu_causal=tps * causal / peak,
              mfu_full=tps * full / peak, step_s=t, mem_bytes=mem, compile_s=compile_s)
    holder.clear()  # frees the state before the next row is built
    return mem
  except Exception as e:  # noqa: BLE001  (a failed row must not end the one-shot run)
    table.failed(f'model {seq:,}', setting, e)
    return None


def _qkv(L, H, K, D, dtype):
  r = np.random.RandomState(0)
  return tuple(jnp.asarray(r.randn(1, L, h, D), dtype) for h in (H, K, K))


def _grad_fn(attend, causal=True):
  loss = lambda q, k, v, s, p: attend(q, k, v, causal=causal,
                                      **self_attention_kwargs(s, p)).astype(jnp.float32).sum()
  return jax.jit(jax.grad(loss, (0, 1, 2)))


def _fwd_fn(attend):
  return jax.jit(lambda q, k, v, s, p: attend(q, k, v, causal=True,
                                              **self_attention_kwargs(s, p)))


def _time(fn, args, repeats):
  return perf.time_call(lambda: jax.block_until_ready(fn(*args)), repeats=repeats)['median']


def single_kernel(impl: str, block: int):
  attend = KERNELS[impl]
  if impl in TILED:
    attend = functools.partial(attend, block_q=block, block_kv=block)
  if impl == 'jax_nn':
    attend = functools.partial(attend, index_ordered=True)
  return attend


def bench_attention(table: Table, s: dict, impls, repeats: int):
  L, H, K, D = s['attn_len'], s['heads'], s['kv'], s['head_dim']
  args = (*_qkv(L, H, K, D, s['dtype']), jnp.ones((1, L), jnp.int32),
          jnp.arange(L, dtype=jnp.int32)[None])
  fwd_flops = 2.0 * L * L * H * D  # 4 L^2 H D, causal half
  for impl in impls:
    block = s['block'] * (4 if impl == 'blockwise' else 1)
    setting = f'{impl}, L {L:,}, {H}x{D} ({K} kv), causal, {s["dtype"]}, block {block}'
    try:
      attend = single_kernel(impl, block)
      tf = _time(_fwd_fn(attend), args, repeats)
      tb = _time(_grad_fn(attend), args, repeats)
      table.add('attn', setting, f'fwd {fwd_flops / tf / 1e12:.3g} TFLOP/s ({tf * 1e3:.2f} ms) '
                f'| fwd+bwd {3.5 * fwd_flops / tb / 1e12:.3g} TFLOP/s ({tb * 1e3:.2f} ms)',
                impl=impl, fwd_s=tf, fwd_bwd_s=tb, fwd_tflops=fwd_flops / tf / 1e12,
                fwd_bwd_tflops=3.5 * fwd_flops / tb / 1e12)
    except Exception as e:  # noqa: BLE001
      table.failed('attn', setting, e)


def _context_attend(impl: str, n: int, s: dict):
  c = base.get_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.context, c.mesh.tensor = 1, 1, n, 1
  c.parallelism.context_impl = impl
  c.attention.block_q = c.attention.block_kv = s['block']
  mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:n])
  return make_context_attend(c, mesh, make_block_kernel(c)), c


def bench_rings(table: Table, s: dict, n: int, repeats: int, tiny: bool = False):
  """fwd+bwd time of each context impl over n devices / the per-block kernel on one device."""
  L, H, K, D = s['attn_len'], s['heads'], s['kv'], s['head_dim']
  q, k, v = _qkv(L, H, K, D, s['dtype'])
  seg, pos = np.ones((1, L), np.int32), np.arange(L, dtype=np.int32)[None]
  c = base.get_config()
  c.attention.block_q = c.attention.block_kv = s['block']
  kernel = make_block_kernel(c)
  base_t = _time(_grad_fn(kernels.attend(kernel)), (q, k, v, seg, pos), repeats)
  impls = ('ring', 'allgather') if n == 1 or tiny else ('ring', 'token_ring', 'allgather')
  to = (lambda x: layout.to_zigzag(np.asarray(x), n)) if n > 1 else np.asarray
  for impl in impls:
    setting = f'{impl}, context {n}, L {L:,}, per-block {kernel.impl}'
    try:
      attend, _ = _context_attend(impl, n, s)
      t = _time(_grad_fn(attend), tuple(to(x) for x in (q, k, v, seg, pos)), repeats)
      table.add(f'ring@{n}', setting, f'fwd+bwd {t * 1e3:.2f} ms = {t / base_t:.3f} x the '
                f'kernel alone on one device ({base_t * 1e3:.2f} ms)', impl=impl, context=n,
                seconds=t, ratio=t / base_t)
    except Exception as e:  # noqa: BLE001
      table.failed(f'ring@{n}', setting, e)


def bench_async(table: Table, s: dict, n: int, tiny: bool = False):
  if n == 1:
    table.add('async', 'ring, token_ring', 'n/a: one device, no collectives to overlap')
    return
  L, H, K, D = 64 * n, s['heads'], s['kv'], s['head_dim']
  for impl in ('ring',) if tiny else ('ring', 'token_ring'):
    try:
      attend, _ = _context_attend(impl, n, dict(s, block=16))
      x = lambda h: jax.ShapeDtypeStruct((1, L, h, D), jnp.dtype(s['dtype']))
      ids = jax.ShapeDtypeStruct((1, L), np.int32)
      p = Program(_grad_fn(attend).lower(x(H), x(K), x(K), ids, ids).compile().as_text())
      counts = p.async_collectives()
      in_cond = len(p.collectives_in_conditionals())
      table.add('async', f'{impl}, context {n}, fwd+bwd',
                f'collective-permute-start {counts.get("collective-permute-start", 0)} | '
                f'synchronous collective-permute {counts.get("collective-permute", 0)} | '
                f'inside conditionals {in_cond}', impl=impl, counts=counts,
                in_conditionals=in_cond)
    except Exception as e:  # noqa: BLE001
      table.failed('async', impl, e)


def main():
  args = parse_args()
  s = TINY if args.tiny else FULL
  skip = set(args.skip.split(',')) - {''}
  if args.tiny:
    args.steps = 1
  dev = jax.devices()[0]
  n = jax.device_count()
  t_start = time.perf_counter()
  print(f'# bench_gpu | {dev.platform} {dev.device_kind} x{n} | jax {jax.__version__} | '
        f'{"tiny (CPU smoke)" if args.tiny else "full"} | median of {args.steps}')
  table = Table()
  mesh = _one_device_mesh(base.get_config())
  dtype = jnp.dtype(s['dtype'])
  peak = perf.measure_peak_flops(mesh, dtype=dtype, n=s['peak_n'])
  table.add('peak', f'{s["dtype"]} matmul {s["peak_n"]}^3, one device',
            f'{peak / 1e12:.1f} TFLOP/s', peak_flops=peak)
  mems = []

  def in_budget(what: str) -> bool:
    if what in skip:
      return False
    if time.perf_counter() - t_start > args.budget_s:
      table.add(what, 'SKIPPED', f'time budget of {args.budget_s:.0f} s spent')
      return False
    return True

  def model_row(seq, remat):
    mem = bench_model(table, s, seq, remat, args.model_impl, peak, args.steps)
    if mem is None and args.fallback_impl and args.fallback_impl != args.model_impl:
      mem = bench_model(table, s, seq, remat, args.fallback_impl, peak, args.steps)
    mems.append(mem or 0)

  if in_budget('model'):
    model_row(s['seq'], 'none')
  if not args.tiny and in_budget('model'):  # (the same code path; the smoke run keeps short)
    model_row(s['long_seq'], 'full')
  if in_budget('attn'):
    bench_attention(table, s, args.attn_impls.split(','), args.steps)
  if not args.tiny and in_budget('ring'):
    bench_rings(table, s, 1, args.steps)
  if n > 1 and in_budget('ring'):
    bench_rings(table, s, n, args.steps, tiny=args.tiny)
  if in_budget('async'):
    bench_async(table, s, n, tiny=args.tiny)
  dev_peak = perf.device_memory_bytes()
  table.add('peak mem', 'device peak bytes in use' if dev_peak else 'largest compiled model step',
            f'{(dev_peak or max(mems + [0])) / GiB:.2f} GiB', bytes=dev_peak or max(mems + [0]))
  model = [r for r in table.json if r['what'].startswith('model') and 'mfu_causal' in r]
  attn = [r for r in table.json if r['what'] == 'attn' and 'fwd_tflops' in r]
  best = max(attn, key=lambda r: r['fwd_tflops']) if attn else None
  elapsed = time.perf_counter() - t_start
  print('summary: ' + ' | '.join(
      [f'{r["what"]} {r["tokens_per_s"]:,.0f} tok/s MFU {r["mfu_causal"]:.0%}' for r in model]
      + ([f'best attn fwd {best["fwd_tflops"]:.1f} TFLOP/s ({best["impl"]})'] if best else [])
      + [f'peak {peak / 1e12:.1f} TFLOP/s', f'{elapsed:.0f} s']))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'device': f'{dev.platform} {dev.device_kind} x{n}', 'jax': jax.__version__,
                 'tiny': args.tiny, 'rows': table.json, 'elapsed_s': elapsed}, f, indent=1,
                default=str)


if __name__ == '__main__':
  main()
