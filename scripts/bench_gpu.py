"""The one-shot GPU benchmark, in stages: each stage a subprocess with its own timeout, each
row appended to the JSON-lines file as soon as it is measured (a timeout loses one stage, or
one item of it, not the run).

    python scripts/bench_gpu.py --json $OUT/bench_gpu.jsonl     # one GPU: < 8 minutes
    python scripts/bench_gpu.py --tiny                          # CPU: all stages, < 3 min (CI)
    python scripts/bench_gpu.py --stages numerics,attn --timeouts attn=300

Stages (in this order; `--stages` picks, `--timeouts stage=s,...` and `--budget_s` limit):
  env       jax / jaxlib / backend / devices / XLA_FLAGS; without a GPU backend the run stops
            here, in seconds (--tiny runs on CPU on purpose)
  numerics  the Pallas kernel's forward (o, lse) and gradients against dense float32
            attention on the device: bf16 and f32, head dim 64 and 128, GQA 4:1, packed
            segments with padding, rows that see no key, a sliding window, causal and not,
            a ring step's shapes; tiles 128 -> 64 -> 32 (forward and backward), recording
            which pass. Later stages use the largest tile that passed
  attn      attention alone at 16,384 tokens, 16 x 128 heads (4 kv), causal, bf16: forward
            and forward+backward TFLOP/s and the max error against cuDNN, for Pallas (the
            tile that passed), cuDNN (`is_causal`, no mask), the repo's jax_nn (packed-row
            mask), JAX's own Pallas GPU kernel, blockwise. (Dense xla is left out: 16 GiB of
            float32 scores at 16K.)
  model     a ~1B dense model (16 layers, d 2048, 16 x 128 heads, 4 kv, SwiGLU 5632, vocab
            32,000) train step at 8K with Pallas and with cuDNN (attention.rows_packed=False)
            and at 32K with remat=full: tokens/s, MFU against the matmul peak measured here
            and against the data-sheet peak (H100 / H200 SXM: 989 TFLOP/s dense bf16)
  rings     more than one device: ring and TokenRing fwd+bwd time against the per-block
            kernel's compute alone (one device's share), and the async collective
            start/done pairs in the compiled program with compute scheduled between them

A stage that dies (crash, timeout) is retried once without the item it was on, which gets a
FAILED row. The driver imports no jax; rows print as they come and a summary ends the run.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ('env', 'numerics', 'attn', 'model', 'rings')
TIMEOUTS = {'env': 90, 'numerics': 150, 'attn': 150, 'model': 300, 'rings': 150}
DATASHEET_TFLOPS = {'H100': 989.0, 'H200': 989.0}  # dense bf16, SXM
TILES = (128, 64, 32)

FULL = dict(layers=16, d=2048, heads=16, kv=4, head_dim=128, mlp=5632, vocab=32000, seq=8192,
            long_seq=32768, attn_len=16384, dtype='bfloat16', peak_n=8192, num_len=512,
            ring_len=16384)
TINY = dict(layers=1, d=32, heads=4, kv=1, head_dim=16, mlp=64, vocab=128, seq=128,
            long_seq=256, attn_len=128, dtype='float32', peak_n=256, num_len=64, ring_len=128)


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--tiny', action='store_true', help='CPU-sized shapes, every stage (CI)')
  ap.add_argument('--json', default='', help='append the rows here (JSON lines)')
  ap.add_argument('--stages', default=','.join(STAGES), help='comma list of stages to run')
  ap.add_argument('--timeouts', default='', help='stage=seconds,... (defaults: %s)' % TIMEOUTS)
  ap.add_argument('--budget_s', type=float, default=470.0,
                  help='no stage starts after this many seconds; each gets at most the rest')
  ap.add_argument('--steps', type=int, default=0,
                  help='timed repeats per row (median); default 5, 1 with --tiny')
  ap.add_argument('--all_tiles', action='store_true',
                  help='numerics: try every tile even after one passed (default on a GPU)')
  # internal: one stage in this process
  ap.add_argument('--stage', default='', help=argparse.SUPPRESS)
  ap.add_argument('--items', default='', help=argparse.SUPPRESS)
  ap.add_argument('--rows', default='', help=argparse.SUPPRESS)
  return ap.parse_args(argv)


# ================================================================ driver (no jax here)

def _read_rows(path):
  if not path or not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _append(path, row):
  with open(path, 'a') as f:
    f.write(json.dumps(row, default=str) + '\n')


def _print_row(row):
  if row.get('kind') == 'start':
    return
  print(f'{row.get("at_s", 0):>5.0f}s {row["stage"]:<9} {row["what"]:<28} {row["result"]}',
        flush=True)


def _stage_cmd(args, stage, items, rows):
  cmd = [sys.executable, os.path.abspath(__file__), '--stage', stage, '--rows', rows,
         '--steps', str(args.steps)]
  if items:
    cmd += ['--items', ','.join(items)]
  if args.tiny:
    cmd.append('--tiny')
  if args.all_tiles:
    cmd.append('--all_tiles')
  return cmd


def run_stage(args, stage, rows_path, timeout, t0):
  """Runs a stage; if it dies, once more without the item it was on. Returns its rc."""
  env = dict(os.environ)
  if args.tiny:  # a context axis to exercise on CPU (the flag affects only the CPU platform)
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                        ' --xla_force_host_platform_device_count=4').strip()
    env.setdefault('JAX_PLATFORMS', 'cpu')
  env['BENCH_GPU_T0'] = str(t0)
  skip, rc = [], 0
  for attempt in range(2):
    before = len(_read_rows(rows_path))
    items = ['!' + s for s in skip]
    started = time.perf_counter()
    try:
      proc = subprocess.run(_stage_cmd(args, stage, items, rows_path), env=env, cwd=ROOT,
                            timeout=timeout, capture_output=True, text=True)
      rc, tail = proc.returncode, (proc.stderr or '')[-1500:]
    except subprocess.TimeoutExpired as e:
      rc, tail = 124, f'timed out after {timeout:.0f} s'
      tail += ('\n' + (e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or '')
               )[-800:]
    new = _read_rows(rows_path)[before:]
    for row in new:
      _print_row(row)
    if rc == 0 or stage == 'env':
      break
    running = _running_item(rows_path, stage)
    row = dict(stage=stage, what=running or stage, result=f'FAILED: stage exit {rc}',
               error=tail, at_s=time.perf_counter() - t0)
    _append(rows_path, row)
    _print_row(row)
    if not running or attempt == 1:
      break
    skip.append(running)
    timeout = max(10.0, timeout - (time.perf_counter() - started))
  return rc


def _running_item(rows_path, stage):
  """The item a stage announced last without finishing it (rows of kind 'start')."""
  started, done = [], set()
  for r in _read_rows(rows_path):
    if r.get('stage') != stage:
      continue
    if r.get('kind') == 'start':
      started.append(r['what'])
    elif 'what' in r:
      done.add(r['what'])
  pending = [w for w in started if w not in done]
  return pending[-1] if pending else None


def driver(args):
  t0 = time.perf_counter()
  args.steps = args.steps or (1 if args.tiny else 5)
  timeouts = dict(TIMEOUTS)
  for part in filter(None, args.timeouts.split(',')):
    k, v = part.split('=')
    timeouts[k] = float(v)
  rows_path = args.json or os.path.join(os.environ.get('TMPDIR', '/tmp'),
                                        f'bench_gpu_{os.getpid()}.jsonl')
  if os.path.exists(rows_path):
    os.remove(rows_path)
  stages = [s for s in args.stages.split(',') if s]
  print(f'# bench_gpu | stages {",".join(stages)} | {"tiny (CPU)" if args.tiny else "full"} | '
        f'rows -> {rows_path}', flush=True)
  for stage in stages:
    if stage not in STAGES:
      raise SystemExit(f'bench_gpu: unknown stage {stage!r}; valid: {list(STAGES)}')
    left = args.budget_s - (time.perf_counter() - t0)
    if left < 10:
      row = dict(stage=stage, what=stage, result=f'SKIPPED: budget of {args.budget_s:.0f} s spent',
                 at_s=time.perf_counter() - t0)
      _append(rows_path, row)
      _print_row(row)
      continue
    rc = run_stage(args, stage, rows_path, min(timeouts[stage], left), t0)
    if stage == 'env' and rc != 0:
      print('bench_gpu: no usable GPU backend (see the env row); stopping. --tiny runs on CPU.',
            flush=True)
      return 3
  rows = _read_rows(rows_path)
  summary = _summary(rows, time.perf_counter() - t0)
  _append(rows_path, dict(stage='summary', what='summary', result=summary))
  print('summary: ' + summary, flush=True)
  return 0


def _summary(rows, elapsed):
  parts = []
  num = [r for r in rows if r.get('what') == 'numerics tile']
  if num:
    parts.append(f'pallas tile {num[-1].get("tile")}')
  for r in rows:
    if r.get('stage') == 'model' and 'tokens_per_s' in r:
      parts.append(f'{r["what"]} {r["tokens_per_s"]:,.0f} tok/s MFU {r["mfu_measured"]:.0%}')
  attn = [r for r in rows if r.get('stage') == 'attn' and 'fwd_tflops' in r]
  if attn:
    best = max(attn, key=lambda r: r['fwd_bwd_tflops'])
    parts.append(f'best attn fwd+bwd {best["fwd_bwd_tflops"]:.3g} TFLOP/s ({best["what"]})')
  failed = sum(str(r.get('result', '')).startswith('FAILED') for r in rows)
  parts += [f'{failed} failed', f'{elapsed:.0f} s']
  return ' | '.join(parts)


# ================================================================ stages (jax from here on)

class Rows:
  """Appends each row to the shared JSON-lines file the moment it exists."""

  def __init__(self, path, stage):
    self.path, self.stage = path, stage
    self.t0 = float(os.environ.get('BENCH_GPU_T0', time.perf_counter()))

  def add(self, what, result, **data):
    _append(self.path, dict(stage=self.stage, what=what, result=result,
                            at_s=time.perf_counter() - self.t0, **data))

  def start(self, what):
    _append(self.path, dict(stage=self.stage, what=what, kind='start'))

  def failed(self, what, err):
    line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    self.add(what, f'FAILED: {type(err).__name__}: {line}', error=traceback.format_exc()[-3000:])


def _items(args, all_items):
  """The items of a stage to run: all, minus '!item' exclusions (the driver's retry)."""
  skip = {i[1:] for i in args.items.split(',') if i.startswith('!')}
  return [i for i in all_items if i not in skip]


def _timed(fn, args, repeats):
  import jax

  from training.metrics import perf
  return perf.time_call(lambda: jax.block_until_ready(fn(*args)), repeats=repeats)['median']


def stage_env(args, rows):
  import jax
  import jaxlib
  devs = jax.devices()
  backend = jax.default_backend()
  kinds = sorted({d.device_kind for d in devs})
  info = dict(jax=jax.__version__, jaxlib=jaxlib.__version__, backend=backend,
              devices=len(devs), kinds=kinds, xla_flags=os.environ.get('XLA_FLAGS', ''),
              python=sys.version.split()[0])
  ok = backend == 'gpu' or args.tiny
  rows.add('environment', f'{backend} {kinds} x{len(devs)} | jax {jax.__version__}' +
           ('' if ok else ' | FAILED: no GPU backend (install jax[cuda12]: docs/gpu.md)'), **info)
  return 0 if ok else 3


# ---------------------------------------------------------------- numerics

def _case_data(name, L, H, K, D, dtype, seed=0):
  """(q, k, v, qseg, kseg, qpos, kpos, causal, window) of one named case, inputs in dtype."""
  import numpy as np
  r = np.random.RandomState(seed)
  ring = name.startswith('ring')
  Lq = L // 2 if ring else L
  q = r.randn(1, Lq, H, D)
  k, v = (r.randn(1, L, K, D) for _ in range(2))
  seg = np.ones((1, L), np.int32)
  seg[0, L // 3:], seg[0, L - L // 8:] = 2, 0  # two documents, then padding
  pos = np.zeros((1, L), np.int32)
  for t in range(1, L):
    pos[:, t] = np.where(seg[:, t] == seg[:, t - 1], pos[:, t - 1] + 1, 0)
  qseg, qpos = seg, pos
  if ring:  # a ring step: half the queries against keys from elsewhere; the first document's
    # queries sit before every key of theirs (they see no key: o = 0, lse = MASK_VALUE)
    qseg, qpos = seg[:, :Lq].copy(), pos[:, :Lq].copy()
    qseg[0, :Lq // 2] = 1
    qpos[0, :Lq // 2] = -1 - np.arange(Lq // 2)
  causal = name not in ('full', 'full_window')
  window = {'window': 100, 'full_window': 64}.get(name, 0)
  cast = lambda x: np.asarray(x, np.float32).astype(dtype)
  return (cast(q), cast(k), cast(v), qseg, seg, qpos, pos, causal, window)


NUM_CASES = (  # (name, dtype, head dim): every property the issue lists, each at least once
    ('causal', 'bfloat16', 128), ('causal', 'float32', 64), ('full', 'bfloat16', 64),
    ('window', 'bfloat16', 128), ('full_window', 'float32', 128), ('ring_step', 'bfloat16', 64),
    ('ring_step', 'float32', 128))


def _check_case(case, tile, s, interpret):
  """Max errors (relative to the reference's scale) of o, lse, dq, dk, dv for one case."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from modeling.kernels import BlockKernel, dense
  name, dtype, D = case
  q, k, v, qseg, kseg, qpos, kpos, causal, window = _case_data(
      name, s['num_len'], 4, 1, D, jnp.dtype(dtype))
  kernel = BlockKernel('pallas', tile, tile, interpret=interpret, block_q_bwd=tile,
                       block_kv_bwd=tile, gpu_shapes=True)
  ids = (qseg, kseg, qpos, kpos)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  r = np.random.RandomState(1)
  do = jnp.asarray(r.randn(*q.shape), q.dtype)

  def ours(q, k, v, do):
    o, lse = kernel.forward(q, k, v, *ids, causal=causal, window=window, out_dtype=q.dtype)
    o32, _ = kernel.forward(q, k, v, *ids, causal=causal, window=window)
    delta = jnp.einsum('blhd,blhd->blh', f32(o32), f32(do))
    grads = kernel.backward(q, k, v, *ids, lse, delta, do, causal=causal, window=window,
                            out_dtype=q.dtype)
    return o, lse, grads

  def ref(q, k, v, do):
    q, k, v, do = map(f32, (q, k, v, do))
    o, lse = dense.flash_forward(q, k, v, *ids, causal=causal, window=window)
    delta = jnp.einsum('blhd,blhd->blh', o, do)
    return o, lse, dense.flash_backward(q, k, v, *ids, lse, delta, do, causal=causal,
                                        window=window)

  got = jax.jit(ours)(q, k, v, do)
  want = jax.jit(ref)(q, k, v, do)
  errs = {}
  for key, a, b in zip(('o', 'lse', 'dq', 'dk', 'dv'), (got[0], got[1], *got[2]),
                       (want[0], want[1], *want[2])):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if key == 'lse':  # rows with no key: both MASK_VALUE; compare the others
      seen = b > -1e29
      a, b = a[seen], b[seen]
    errs[key] = float(np.abs(a - b).max() / max(1.0, np.abs(b).max())) if b.size else 0.0
  return errs, got[0].dtype == q.dtype and all(g.dtype == q.dtype for g in got[2])


def stage_numerics(args, rows, s):
  import jax
  interpret = jax.default_backend() == 'cpu'
  all_tiles = args.all_tiles or not args.tiny
  passed = []
  # --tiny: a code-path check at CPU speed (interpret mode compiles slowly): three cases
  # covering causal / full / ring step, bf16 and both head dims. tests/test_kernels.py checks
  # every property at the GPU tiles in interpret mode.
  cases = (NUM_CASES[0], NUM_CASES[2], NUM_CASES[5]) if args.tiny else NUM_CASES
  for tile in _items(args, [str(t) for t in TILES]):
    what = f'numerics tile {tile}'
    rows.start(what)
    worst, bad, errors = {}, [], []
    for case in cases:
      label = f'{case[0]}/{case[1]}/d{case[2]}'
      try:
        errs, dtypes_ok = _check_case(case, int(tile), s, interpret)
      except Exception as e:  # noqa: BLE001  (a compile failure fails this tile, not the run)
        errors.append(f'{label}: {type(e).__name__}: {str(e).splitlines()[0][:120]}')
        continue
      tol = 2e-2 if case[1] == 'bfloat16' else 2e-4
      worst[label] = max(errs.values())
      if max(errs.values()) > tol or not dtypes_ok:
        bad.append(f'{label} {max(errs, key=errs.get)} {max(errs.values()):.2g}'
                   + ('' if dtypes_ok else ' (output dtype)'))
    ok = not bad and not errors
    if ok:
      passed.append(int(tile))
    rows.add(what, ('pass' if ok else 'FAILED: ' + '; '.join(bad + errors)[:300]) +
             f' | worst {max(worst.values(), default=0):.2g} over {len(cases)} cases',
             tile=int(tile), passed=ok, errors=worst, failures=bad + errors)
    if ok and not all_tiles:
      break
  best = max(passed, default=0)
  rows.add('numerics tile', f'use {best}' if best else 'FAILED: no tile passed', tile=best,
           passed_tiles=passed)
  return 0


# ---------------------------------------------------------------- attention

def _passed_tile(args, default):
  tiles = [r.get('tile') for r in _read_rows(args.rows) if r.get('what') == 'numerics tile']
  return tiles[-1] if tiles and tiles[-1] else default


def _attn_impls(tile, tiny):
  import functools

  import jax
  import jax.numpy as jnp

  from modeling.attention import self_attention_kwargs
  from modeling.kernels import BlockKernel, attend, blockwise_attention, on_cpu
  from modeling.kernels.jax_nn import jax_nn_attention

  def ids_fn(fn):
    return lambda q, k, v, seg, pos: fn(q, k, v, causal=True, **self_attention_kwargs(seg, pos))

  def cudnn(q, k, v, seg, pos):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')

  def jax_reference(q, k, v, seg, pos):
    from jax.experimental.pallas.ops.gpu import attention as ref
    G = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, G, axis=2) for x in (k, v))
    b = min(tile, q.shape[1])
    sizes = ref.BlockSizes(block_q=b, block_k=b, block_q_dkv=min(32, b), block_kv_dkv=min(32, b),
                           block_q_dq=min(32, b), block_kv_dq=min(32, b))
    return ref.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True, block_sizes=sizes,
                   interpret=on_cpu())

  pallas = BlockKernel('pallas', tile, min(tile, 64), interpret=on_cpu())
  return {
      f'pallas t{tile}': ids_fn(attend(pallas)),
      'cudnn': cudnn,
      'jax_nn (repo)': ids_fn(functools.partial(jax_nn_attention, index_ordered=True)),
      'jax pallas ref': jax_reference,
      'blockwise': ids_fn(functools.partial(blockwise_attention, block_q=512 if not tiny else 64,
                                            block_kv=512 if not tiny else 64)),
  }


def stage_attn(args, rows, s):
  import jax
  import jax.numpy as jnp
  import numpy as np
  L, H, K, D, dtype = s['attn_len'], s['heads'], s['kv'], s['head_dim'], s['dtype']
  tile = _passed_tile(args, 64 if not args.tiny else 32)
  r = np.random.RandomState(0)
  q, k, v = (jnp.asarray(r.randn(1, L, h, D), dtype) for h in (H, K, K))
  seg, pos = jnp.ones((1, L), jnp.int32), jnp.arange(L, dtype=jnp.int32)[None]
  args_ = (q, k, v, seg, pos)
  fwd_flops = 2.0 * L * L * H * D  # 4 L^2 H D, causal half
  impls = _attn_impls(tile, args.tiny)
  ref_out = None
  if jax.default_backend() == 'gpu':
    try:
      ref_out = np.asarray(jax.jit(impls['cudnn'])(*args_), np.float32)
    except Exception:  # noqa: BLE001
      ref_out = None
  if ref_out is None:  # CPU, or no cuDNN: dense float32 attention (small shapes only)
    from modeling.kernels.dense import xla_attention
    from modeling.attention import self_attention_kwargs
    if L <= 4096:
      f32 = lambda x: jnp.asarray(x, jnp.float32)
      ref_out = np.asarray(xla_attention(f32(q), f32(k), f32(v), causal=True,
                                         **self_attention_kwargs(seg, pos)))
  ref_name = 'cuDNN' if jax.default_backend() == 'gpu' else 'dense f32'
  for name in _items(args, list(impls)):
    rows.start(name)
    fn = impls[name]
    if name in ('cudnn',) and jax.default_backend() != 'gpu':
      rows.add(name, 'n/a: cuDNN needs a GPU')
      continue
    try:
      out = np.asarray(jax.jit(fn)(*args_), np.float32)
      err = float(np.abs(out - ref_out).max()) if ref_out is not None else float('nan')
      grad = jax.jit(jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), (0, 1, 2)))
      tf = _timed(jax.jit(fn), args_, args.steps)
      tb = _timed(grad, args_, args.steps)
      rows.add(name, f'fwd {fwd_flops / tf / 1e12:.3g} TFLOP/s ({tf * 1e3:.2f} ms) | fwd+bwd '
               f'{3.5 * fwd_flops / tb / 1e12:.3g} TFLOP/s ({tb * 1e3:.2f} ms) | max err vs '
               f'{ref_name} {err:.2g}', L=L, heads=H, kv=K, head_dim=D, dtype=dtype,
               fwd_s=tf, fwd_bwd_s=tb, fwd_tflops=fwd_flops / tf / 1e12,
               fwd_bwd_tflops=3.5 * fwd_flops / tb / 1e12, max_err=err, ref=ref_name)
    except Exception as e:  # noqa: BLE001
      rows.failed(name, e)
  return 0


# ---------------------------------------------------------------- model

def _model_config(s, seq, remat, impl, tile):
  from configs import base
  c = base.get_config()
  c.seq_len, c.batch_size, c.steps = seq, 1, 10
  c.data.source = 'synthetic'   # the rows below are made here: no bytes-per-token counts
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads = s['layers'], s['d'], s['heads'], s['kv']
  m.head_dim, m.mlp_dim, m.vocab_size = s['head_dim'], s['mlp'], s['vocab']
  m.dtype, m.param_dtype, m.remat, m.scan_layers = s['dtype'], 'float32', remat, True
  c.attention.impl = impl
  c.attention.block_q = c.attention.block_kv = min(tile, seq)
  c.attention.rows_packed = impl != 'jax_nn'  # the benchmark rows hold one sequence each
  c.mesh.data = c.mesh.fsdp = c.mesh.context = c.mesh.tensor = 1
  return c


def stage_model(args, rows, s):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from parallelism import mesh as mesh_lib
  from training.metrics import perf
  from training.composition import resolve_attention_impl
  from training.program import build_program
  tile = _passed_tile(args, 64)
  on_gpu = jax.default_backend() == 'gpu'
  mesh = mesh_lib.make_mesh(_model_config(s, s['seq'], 'none', 'auto', tile).mesh,
                            jax.devices()[:1])
  peak = perf.measure_peak_flops(mesh, dtype=jnp.dtype(s['dtype']), n=s['peak_n'])
  kind = jax.devices()[0].device_kind
  sheet = next((v for k, v in DATASHEET_TFLOPS.items() if k in kind), None)
  rows.add('peak', f'{s["dtype"]} matmul {s["peak_n"]}^3: {peak / 1e12:.1f} TFLOP/s measured'
           + (f' | data sheet {sheet:.0f}' if sheet else ''), peak_flops=peak,
           datasheet_tflops=sheet)
  items = {f'model {s["seq"]} pallas': (s['seq'], 'none', 'pallas' if on_gpu else 'auto'),
           f'model {s["seq"]} cudnn': (s['seq'], 'none', 'jax_nn'),
           f'model {s["long_seq"]} remat': (s['long_seq'], 'full',
                                            'pallas' if on_gpu else 'blockwise')}
  for name in _items(args, list(items)):
    seq, remat, impl = items[name]
    rows.start(name)
    c = _model_config(s, seq, remat, impl, tile)
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

      t = perf.time_call(one_step, repeats=args.steps)
      tps = seq / t['median']
      flops = perf.train_flops_per_token(c.model, seq, causal=True)
      mem = perf.compiled_memory_bytes(compiled)
      mfu_sheet = tps * flops / (sheet * 1e12) if sheet else None
      rows.add(name, f'{tps:,.0f} tok/s | MFU {tps * flops / peak:.1%} of measured' +
               (f', {mfu_sheet:.1%} of data sheet' if sheet else '') +
               f' | step {t["median"] * 1e3:.1f} ms | mem {mem / 2**30:.2f} GiB | compile '
               f'{compile_s:.0f} s | attention {impl}->{resolve_attention_impl(c, mesh)}',
               tokens_per_s=tps, mfu_measured=tps * flops / peak, mfu_datasheet=mfu_sheet,
               step_s=t, mem_bytes=mem, compile_s=compile_s)
      holder.clear()
    except Exception as e:  # noqa: BLE001
      rows.failed(name, e)
  return 0


# ---------------------------------------------------------------- rings

def stage_rings(args, rows, s):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import base
  from modeling.attention import self_attention_kwargs
  from modeling.kernels import attend, auto
  from parallelism import mesh as mesh_lib
  from parallelism.context import layout, make_context_attend
  from parallelism.context.overlap import Program
  n = jax.device_count()
  if n == 1:
    rows.add('rings', 'n/a: one device')
    return 0
  L, H, K, D = s['ring_len'], s['heads'], s['kv'], s['head_dim']
  tile = _passed_tile(args, 64 if not args.tiny else 16)
  r = np.random.RandomState(0)
  q, k, v = (jnp.asarray(r.randn(1, L, h, D), s['dtype']) for h in (H, K, K))
  seg, pos = np.ones((1, L), np.int32), np.arange(L, dtype=np.int32)[None]

  def config(impl):
    c = base.get_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.context, c.mesh.tensor = 1, 1, n, 1
    c.parallelism.context_impl = impl
    c.attention.impl = 'auto'
    c.attention.block_q = c.attention.block_kv = tile
    return c

  grad = lambda fn: jax.jit(jax.grad(lambda q, k, v, s_, p_: fn(
      q, k, v, causal=True, **self_attention_kwargs(s_, p_)).astype(jnp.float32).sum(),
      (0, 1, 2)))
  kernel = auto.make_block_kernel(config('ring').attention)
  base_t = _timed(grad(attend(kernel)), (q, k, v, seg, pos), args.steps) / n
  zz = lambda x: layout.to_zigzag(np.asarray(x), n)
  for impl in _items(args, ['ring', 'token_ring']):
    rows.start(impl)
    try:
      c = config(impl)
      mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:n])
      fn = grad(make_context_attend(c, mesh, kernel))
      zargs = tuple(zz(x) for x in (q, k, v, seg, pos))
      t = _timed(fn, zargs, args.steps)
      prog = Program(fn.lower(*zargs).compile().as_text())
      pairs, overlapped = prog.async_pairs_with_compute()
      sync = prog.async_collectives().get('collective-permute', 0)
      rows.add(impl, f'context {n}: fwd+bwd {t * 1e3:.2f} ms = {t / base_t:.2f} x compute only '
               f'({base_t * 1e3:.2f} ms: one device\'s share of the {kernel.impl} kernel) | '
               f'async permute pairs {pairs}, {overlapped} with compute between | sync '
               f'permutes {sync}', context=n, seconds=t, compute_only_s=base_t,
               ratio=t / base_t, async_pairs=pairs, async_overlapped=overlapped,
               sync_permutes=sync, in_conditionals=len(prog.collectives_in_conditionals()))
    except Exception as e:  # noqa: BLE001
      rows.failed(impl, e)
  return 0


def stage_main(args):
  sys.path.insert(0, ROOT)
  if not args.tiny:
    from configs import base
    from parallelism import xla_flags
    xla_flags.apply(base.get_config())  # the overlap flags, before the backend starts
  s = TINY if args.tiny else FULL
  rows = Rows(args.rows, args.stage)
  fn = {'env': lambda: stage_env(args, rows), 'numerics': lambda: stage_numerics(args, rows, s),
        'attn': lambda: stage_attn(args, rows, s), 'model': lambda: stage_model(args, rows, s),
        'rings': lambda: stage_rings(args, rows, s)}[args.stage]
  return fn()


def main(argv=None):
  args = parse_args(argv)
  if args.stage:
    return stage_main(args)
  return driver(args)


if __name__ == '__main__':
  sys.exit(main())
