"""Per-block kernels (`modeling/kernels/`) against the blockwise reference, and `auto`'s choices.

The Pallas kernel runs in Pallas interpret mode on CPU (the same kernel body the Triton
lowering compiles on GPU): forward within 1e-5, gradients within 1e-4, with packed segments,
separate query / key ids (a ring step's shapes: fewer queries than keys), sliding windows and
GQA (4 query heads over 2 kv heads). Shapes are tiny: interpret mode runs every grid
program in Python-level loops.
"""

import logging

import jax
import numpy as np
import pytest

from configs import base
from modeling.attention import self_attention_kwargs
from modeling.kernels import BlockKernel, attend
from modeling.kernels import auto
from parallelism import mesh as mesh_lib
from parallelism.context import make_context_attend
from tests import attention_data as data
from training import loss as loss_lib
from training.composition import make_attend, resolve_attention_impl

BLOCKWISE = BlockKernel('blockwise', 16, 8)
PALLAS = BlockKernel('pallas', 16, 8, interpret=True)
DENSE = BlockKernel('xla')


def _grads(kernel, causal, window, seg, pos):
  loss = lambda q, k, v: (attend(kernel)(q, k, v, causal=causal, window=window,
                                         **self_attention_kwargs(seg, pos))
                          * data.head_weights()).sum()
  return jax.grad(loss, (0, 1, 2))


@pytest.mark.parametrize('impl,causal,window', [('pallas', True, 7), ('pallas', False, 0),
                                                ('xla', True, 7)],
                         ids=['pallas-causal_w7', 'pallas-full', 'xla-causal_w7'])
def test_kernel_matches_blockwise(impl, causal, window):
  kernel = PALLAS if impl == 'pallas' else DENSE
  q, k, v = data.qkv()
  seg, pos = data.segments(packed=True)
  # Forward on a ring step's shapes: the last 32 queries against all 64 keys.
  qs = slice(32, 64)
  args = (q[:, qs], k, v, seg[:, qs], seg, pos[:, qs], pos)
  run = lambda kern: jax.jit(lambda *a: kern.forward(*a, causal=causal, window=window))(*args)
  (o, lse), (o_ref, lse_ref) = run(kernel), run(BLOCKWISE)
  np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=0)
  np.testing.assert_allclose(lse, lse_ref, atol=1e-5, rtol=0)
  grads = jax.jit(_grads(kernel, causal, window, seg, pos))(q, k, v)
  grads_ref = jax.jit(_grads(BLOCKWISE, causal, window, seg, pos))(q, k, v)
  for name, g, g_ref in zip('qkv', grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=0, err_msg=f'd{name} {impl}')


def test_pallas_kernel_in_a_ring():
  """The ring calls the configured per-block kernel: Pallas steps equal blockwise steps."""
  c = base.get_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.context, c.mesh.tensor = 1, 1, 2, 1
  c.parallelism.context_impl, c.parallelism.zigzag = 'ring', False
  mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:2])
  q, k, v = data.qkv()
  seg, pos = data.segments(packed=True)
  out = {}
  for kernel in (PALLAS, BLOCKWISE):
    f = make_context_attend(c, mesh, kernel)
    loss = lambda q, k, v: (f(q, k, v, causal=True, window=0, **self_attention_kwargs(seg, pos))
                            * data.head_weights()).sum()
    out[kernel.impl] = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
  for name, g, g_ref in zip('qkv', out['pallas'], out['blockwise']):
    np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=0, err_msg=f'd{name}')


def test_splash_in_interpret_mode():
  """TPU Splash (index-order masks + segment ids) equals plain attention on the tokens that
  matter (padding may differ, see modeling/kernels/splash.py): packed, causal window, GQA.
  Splash needs multiples of 128, hence its own, longer, single-row data."""
  from modeling.attention import xla_attention
  from modeling.kernels.splash import splash_attention
  r = np.random.RandomState(0)
  L, H, K, D = 256, 4, 2, 16
  q, k, v = (r.randn(1, L, h, D).astype(np.float32) for h in (H, K, K))
  seg = np.ones((1, L), np.int32)
  seg[0, 100:], seg[0, 230:] = 2, 0
  pos = np.zeros((1, L), np.int32)
  for t in range(1, L):
    pos[:, t] = np.where(seg[:, t] == seg[:, t - 1], pos[:, t - 1] + 1, 0)
  kw = dict(causal=True, window=40, **self_attention_kwargs(seg, pos))
  weights = (seg > 0)[..., None, None] * np.sin(np.arange(H * D)).reshape(H, D)

  def both(attend):
    f = lambda q, k, v: (attend(q, k, v, **kw) * weights).sum()
    return jax.jit(lambda q, k, v: (attend(q, k, v, **kw), jax.grad(f, (0, 1, 2))(q, k, v)))

  o, g = both(lambda *a, **kw: splash_attention(*a, block_q=128, block_kv=128, interpret=True,
                                                **kw))(q, k, v)
  o_ref, g_ref = both(xla_attention)(q, k, v)
  np.testing.assert_allclose(np.asarray(o)[seg > 0], np.asarray(o_ref)[seg > 0], atol=1e-5)
  for name, a, b in zip('qkv', g, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=f'd{name}')


def test_auto_choices_are_logged(caplog):
  assert auto.choose('gpu', batch=1, heads=8, q_len=512, kv_len=512)[0] == 'pallas'  # packed
  assert auto.choose('gpu', batch=1, heads=8, q_len=512, kv_len=512, index_ordered=True,
                     packed=False)[0] == 'jax_nn'  # cuDNN
  assert auto.choose('gpu', batch=1, heads=8, q_len=512, kv_len=512, index_ordered=True,
                     packed=False, head_dim=256)[0] == 'pallas'
  assert auto.choose('gpu', batch=1, heads=8, q_len=512, kv_len=512, index_ordered=True,
                     packed=False, dtype='float32')[0] == 'pallas'
  assert auto.choose('cpu', batch=1, heads=8, q_len=4096, kv_len=4096)[0] == 'xla'  # 512 MiB
  assert auto.choose('cpu', batch=1, heads=6, q_len=65536, kv_len=65536)[0] == 'blockwise'
  assert auto.block_impl('auto', 'gpu')[0] == 'pallas'
  assert auto.choose('tpu', batch=1, heads=8, q_len=4096, kv_len=4096,
                     index_ordered=True)[0] == 'splash'
  assert auto.choose('tpu', batch=1, heads=8, q_len=4096, kv_len=4096)[0] == 'xla'
  c = base.get_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.context, c.mesh.tensor = 1, 1, 1, 1
  mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
  assert c.attention.impl == 'auto' and c.attention.loss_chunk == -1  # the defaults
  with caplog.at_level(logging.INFO):
    assert resolve_attention_impl(c, mesh) == 'xla'
    c.seq_len = 65536
    assert resolve_attention_impl(c, mesh) == 'blockwise'
  assert 'attention.impl=auto -> blockwise' in caplog.text
  c.attention.impl = 'flash'
  with pytest.raises(ValueError, match="attention.impl='flash'"):
    make_attend(c, mesh)
  c.attention.impl = 'splash'
  with pytest.raises(ValueError, match="attention.impl='splash' needs a TPU"):
    make_attend(c, mesh)


def test_fallbacks_warn_once_or_refuse_under_strict(caplog):
  """A ring with a kernel that masks by index runs another per-block kernel: WARNING once
  (O(L x block) memory kept, but not the kernel named), an error under attention.strict."""
  from modeling.kernels import policy
  policy._warned.clear()  # once per process: forget what earlier tests were warned about
  with caplog.at_level(logging.WARNING, logger='loomax'):
    assert auto.block_impl('jax_nn', 'cpu')[0] == 'blockwise'
    assert auto.block_impl('jax_nn', 'cpu')[0] == 'blockwise'
    assert auto.block_impl('splash', 'tpu')[0] == 'blockwise'
    assert auto.block_impl('jax_nn', 'gpu')[0] == 'pallas'
  warned = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warned) == 3
  assert 'attention.impl=jax_nn under context parallelism' in warned[0].getMessage()
  with pytest.raises(ValueError, match='attention.strict=True'):
    auto.block_impl('jax_nn', 'gpu', strict=True)
  # jax_nn asked for cuDNN on GPU where it cannot: dense O(L^2) is a fallback too.
  from modeling.kernels import jax_nn
  ok, why = jax_nn.cudnn_expresses(backend='gpu', causal=True, index_ordered=False,
                                   head_dim=128, dtype='bfloat16')
  assert not ok and 'index order' in why


def test_pallas_tiles_above_the_cap_warn_naming_the_key(caplog):
  from modeling.kernels import policy
  policy._warned.clear()
  q, k, v = (np.zeros((1, 256, h, 16), np.float32) for h in (2, 1, 1))
  kernel = BlockKernel('pallas', 512, 512, block_q_bwd=256, interpret=True)
  with caplog.at_level(logging.WARNING, logger='loomax'):
    assert kernel._pallas_tiles(q, k, False) == {'block_q': 128, 'block_kv': 128}
    assert kernel._pallas_tiles(q, k, True) == {'block_q': 128, 'block_kv': 32}
  for key in ('attention.block_q=512', 'attention.block_kv=512', 'attention.block_q_bwd=256'):
    assert key in caplog.text
  with pytest.raises(ValueError, match='attention.block_kv_bwd=24'):
    BlockKernel('pallas', 64, 64, block_kv_bwd=24, interpret=True,
                gpu_shapes=True)._pallas_tiles(q, k, True)


def _gpu_case(L, H, K, D, dtype, seed=0):
  """One row, two packed documents and padding, GQA H:K, inputs rounded to `dtype`."""
  r = np.random.RandomState(seed)
  q, k, v = (r.randn(1, L, h, D).astype(np.float32) for h in (H, K, K))
  seg = np.ones((1, L), np.int32)
  seg[0, L // 3:], seg[0, L - L // 8:] = 2, 0
  pos = np.zeros((1, L), np.int32)
  for t in range(1, L):
    pos[:, t] = np.where(seg[:, t] == seg[:, t - 1], pos[:, t - 1] + 1, 0)
  cast = lambda x: np.asarray(jax.numpy.asarray(x, dtype).astype(np.float32))
  return cast(q), cast(k), cast(v), seg, pos


@pytest.mark.parametrize('tile,bwd,D,dtype,causal,window', [
    (128, 0, 64, 'float32', True, 0),
    (64, 32, 128, 'bfloat16', True, 100),
    (32, 64, 64, 'bfloat16', False, 0),
], ids=['t128-d64-f32-causal', 't64-bwd32-d128-bf16-window', 't32-bwd64-d64-bf16-full'])
def test_pallas_at_gpu_tile_sizes(tile, bwd, D, dtype, causal, window):
  """Interpret mode at the tiles a GPU runs (128/64/32, separate backward tiles, Triton's
  shape rules enforced), bf16 and head dims 64 and 128, GQA 4:1, packed rows with padding:
  forward and gradients against dense float32 attention on the same (rounded) inputs."""
  from modeling.attention import xla_attention
  L, H, K = 256, 4, 1
  q, k, v, seg, pos = _gpu_case(L, H, K, D, dtype)
  kw = dict(causal=causal, window=window, **self_attention_kwargs(seg, pos))
  weights = np.cos(np.arange(H * D)).reshape(H, D).astype(np.float32)
  kernel = BlockKernel('pallas', tile, tile, interpret=True, block_q_bwd=bwd, block_kv_bwd=bwd,
                       gpu_shapes=True)

  def run(attend, cast):
    f = lambda q, k, v: (attend(q, k, v, **kw).astype(np.float32) * weights).sum()
    args = tuple(jax.numpy.asarray(x, cast) for x in (q, k, v))
    return jax.jit(lambda *a: (attend(*a, **kw), jax.grad(f, (0, 1, 2))(*a)))(*args)

  o, g = run(attend(kernel), dtype)
  o_ref, g_ref = run(xla_attention, 'float32')
  assert o.dtype == jax.numpy.dtype(dtype) and all(x.dtype == o.dtype for x in g)
  tol = 1e-4 if dtype == 'float32' else 3e-2
  scale = lambda x: max(1.0, float(np.abs(x).max()))
  np.testing.assert_allclose(np.asarray(o, np.float32), o_ref, atol=tol * scale(o_ref), rtol=0)
  for name, a, b in zip('qkv', g, g_ref):
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=tol * scale(b), rtol=0,
                               err_msg=f'd{name}')


def test_jax_nn_logs_its_fallback(caplog):
  q, k, v = data.qkv()
  seg, pos = data.segments(packed=True)
  from modeling.attention import jax_nn_attention, xla_attention
  with caplog.at_level(logging.INFO, logger='loomax'):
    o = jax_nn_attention(q, k, v, causal=True, window=0, **self_attention_kwargs(seg, pos))
  assert 'XLA implementation (not a GPU backend' in caplog.text
  np.testing.assert_allclose(o, xla_attention(q, k, v, causal=True, window=0,
                                              **self_attention_kwargs(seg, pos)), atol=1e-5)


def test_auto_loss_chunk():
  assert loss_lib.auto_chunk(1, 512, 8192) == 0  # 16 MiB of logits: no chunking
  chunk = loss_lib.auto_chunk(1, 65536, 8192)    # 2 GiB: chunks of at most 256 MiB
  assert chunk == 8192 and 65536 % chunk == 0


def test_bench_gpu_tiny(tmp_path):
  """The staged GPU benchmark runs every stage on CPU with --tiny in under 3 minutes, each
  row in the JSON-lines file as it comes, none failing; without --tiny and without a GPU it
  stops at the environment check in seconds."""
  import json
  import os
  import subprocess
  import sys
  import time
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / 'bench_gpu.jsonl'
  # The suite's fast-compile flags (conftest) carry over; the device count is the script's.
  flags = ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f)
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=flags)
  t0 = time.perf_counter()
  run = subprocess.run([sys.executable, 'scripts/bench_gpu.py', '--tiny', '--json', str(out)],
                       cwd=root, env=env, capture_output=True, text=True, timeout=600)
  wall = time.perf_counter() - t0
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
  assert 'FAILED' not in run.stdout, run.stdout
  assert run.stdout.strip().splitlines()[-1].startswith('summary: pallas tile')
  assert wall < 180, f'--tiny took {wall:.0f} s'
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  done = [r for r in rows if r.get('kind') != 'start']
  assert {r['stage'] for r in done} == {'env', 'numerics', 'attn', 'model', 'rings',
                                        'summary'}
  assert [r['tile'] for r in done if r['what'] == 'numerics tile'] == [128]
  attn = {r['what'] for r in done if r['stage'] == 'attn'}
  assert attn == {'pallas t128', 'cudnn', 'jax_nn (repo)', 'jax pallas ref', 'blockwise'}
  rings = {r['what']: r for r in done if r['stage'] == 'rings'}
  # CPU: synchronous permutes, none inside a conditional; ring 5 = forward 1 (one packed
  # buffer per step) + backward 4 (step 0, the loop, the lagged last step, the hop home).
  assert rings['ring']['sync_permutes'] == 5 and rings['ring']['in_conditionals'] == 0
  assert rings['token_ring']['sync_permutes'] == 2 * 2 * 3
  help_run = subprocess.run([sys.executable, 'scripts/bench_gpu.py', '--help'], cwd=root,
                            env=env, capture_output=True, text=True, timeout=120)
  assert help_run.returncode == 0 and '--tiny' in help_run.stdout
  t0 = time.perf_counter()
  no_gpu = subprocess.run([sys.executable, 'scripts/bench_gpu.py', '--json',
                           str(tmp_path / 'full.jsonl')], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
  assert no_gpu.returncode == 3 and 'no usable GPU backend' in no_gpu.stdout, no_gpu.stdout
  assert time.perf_counter() - t0 < 60


def test_pallas_loop_bounds_stop_at_the_diagonal():
  """The kernel's key-block ranges (from the conservative block table): causal in index order
  ends at the diagonal, a sliding window starts at its first live block, a packed row's
  ranges cover every block that holds a live entry."""
  from modeling.kernels import pallas_flash
  L, b = 256, 32
  seg = np.ones((1, L), np.int32)
  pos = np.arange(L, dtype=np.int32)[None]
  ranges = lambda seg, pos, **kw: np.asarray(pallas_flash._ranges(pallas_flash._live(
      seg, seg, pos, pos, bq=b, bk=b, **kw)))[0]
  n = L // b
  np.testing.assert_array_equal(ranges(seg, pos, causal=True, window=0),
                                [[0, i + 1] for i in range(n)])
  np.testing.assert_array_equal(ranges(seg, pos, causal=False, window=0), [[0, n]] * n)
  np.testing.assert_array_equal(ranges(seg, pos, causal=True, window=40),
                                [[max(0, i - 2), i + 1] for i in range(n)])
  q, k, v, seg, pos = _gpu_case(L, 2, 1, 16, 'float32')
  r = ranges(seg, pos, causal=True, window=0)
  from modeling.masking import attention_mask
  live = np.asarray(attention_mask(seg, seg, pos, pos, causal=True))[0]
  needed = live.reshape(n, b, n, b).any(axis=(1, 3))
  for i in range(n):
    cols = np.nonzero(needed[i])[0]
    if cols.size:
      assert r[i, 0] <= cols.min() and cols.max() < r[i, 1]


def test_kernel_modules_import_downward_only():
  """No import circle: the mask rule is a leaf, blockwise and the kernels never import the
  seam module (modeling/attention.py re-exports them), and nothing imports them function-
  locally to dodge a circle (splash's TPU modules are imported on use, for their cost)."""
  import ast
  import glob
  import os
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  files = [os.path.join(root, 'modeling', f) for f in ('masking.py', 'blockwise.py')]
  files += glob.glob(os.path.join(root, 'modeling', 'kernels', '*.py'))
  for path in files:
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
      if not isinstance(node, (ast.Import, ast.ImportFrom)):
        continue
      names = [node.module or ''] if isinstance(node, ast.ImportFrom) else [
          a.name for a in node.names]
      names += [f'{node.module}.{a.name}' for a in node.names] if isinstance(
          node, ast.ImportFrom) else []
      assert not any(n == 'modeling.attention' for n in names), (path, node.lineno)
      if node.col_offset and any(n.startswith('modeling') for n in names):
        assert path.endswith(os.path.join('kernels', '__init__.py')) and 'splash' in str(
            names), (path, node.lineno, names)
  masking = ast.parse(open(files[0]).read())
  assert not [n for n in ast.walk(masking) if isinstance(n, ast.ImportFrom)
              and (n.module or '').startswith('modeling')]
