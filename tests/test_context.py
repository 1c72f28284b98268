"""Context parallelism (all-gather, ring, TokenRing, auto) equals single-device attention.

8 fake CPU devices, float32. Each (impl, context size, causal) program is compiled once and
run on an unpacked and a packed batch (GQA: 4 query heads over 2 kv heads), in the zigzag
layout when causal; the results are mapped back and compared with plain attention on the
original order: outputs within 1e-5, dq/dk/dv within 1e-4. A 3-step training run on mesh
(data=2, context=4) equals the single-device run for every implementation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from modeling.attention import self_attention_kwargs, xla_attention
from parallelism import mesh as mesh_lib
from parallelism.context import balance, cost, layout, make_context_attend
from tests import attention_data as data
from tests import helpers
from training.program import build_program


def _config(impl: str, context: int, **mesh):
  c = base.get_config()
  c.mesh.data, c.mesh.context, c.mesh.tensor = 1, context, 1
  for k, v in mesh.items():
    setattr(c.mesh, k, v)
  c.parallelism.context_impl = impl
  c.attention.block_q = c.attention.block_kv = 8
  return c


# Context size -> the rest of the mesh: batch over data or fsdp, heads over tensor.
MESHES = {2: {'data': 2, 'tensor': 2}, 4: {'fsdp': 2}, 8: {}}


def _loss(attend, q, k, v, seg, pos, causal, window):
  o = attend(q, k, v, causal=causal, window=window, **self_attention_kwargs(seg, pos))
  return (o * data.head_weights()[:, :q.shape[-1]]).sum(), o


def _value_and_grads(attend, causal, window=0):
  return jax.jit(lambda q, k, v, seg, pos: jax.value_and_grad(
      lambda a, b, c: _loss(attend, a, b, c, seg, pos, causal, window), (0, 1, 2),
      has_aux=True)(q, k, v))


@pytest.fixture(scope='module')
def reference():
  cache = {}

  def get(causal, window=0, mha=False):
    if (causal, window, mha) not in cache:
      fn = _value_and_grads(xla_attention, causal, window)
      cache[causal, window, mha] = {packed: fn(*_qkv(mha), *data.segments(packed))
                                    for packed in (False, True)}
    return cache[causal, window, mha]

  return get


def _qkv(mha=False):
  q, k, v = data.qkv()
  if mha:  # every query head its own K/V
    k, v = np.repeat(k, data.H // data.K, axis=2), np.repeat(v, data.H // data.K, axis=2)
  return q, k, v


def _check(impl, n, causal, reference, window=0, mha=False, mesh_extra=None):
  c = _config(impl, n, **(MESHES[n] if mesh_extra is None else mesh_extra))
  mesh = mesh_lib.make_mesh(c.mesh)
  fn = _value_and_grads(make_context_attend(c, mesh), causal, window)
  zigzag = causal and c.parallelism.zigzag
  to = (lambda x: layout.to_zigzag(x, n)) if zigzag else (lambda x: x)
  back = (lambda x: layout.from_zigzag(np.asarray(x), n)) if zigzag else np.asarray
  for packed in (False, True):
    (_, o), grads = fn(*(to(x) for x in (*_qkv(mha), *data.segments(packed))))
    (_, o_ref), grads_ref = reference(causal, window, mha)[packed]
    np.testing.assert_allclose(back(o), o_ref, atol=1e-5, rtol=0,
                               err_msg=f'{impl} n={n} packed={packed}')
    for name, g, g_ref in zip('qkv', grads, grads_ref):
      np.testing.assert_allclose(back(g), g_ref, atol=1e-4, rtol=0,
                                 err_msg=f'd{name}: {impl} n={n} packed={packed}')


# (Not causal at 8 devices: the non-causal paths do not change with the size past 4, and the
# TokenRing unrolls its steps, so each size is a compile of its own.)
@pytest.mark.parametrize('n,causal', [(2, True), (2, False), (4, True), (4, False), (8, True)],
                         ids=['2-causal', '2-full', '4-causal', '4-full', '8-causal'])
@pytest.mark.parametrize('impl', ['allgather', 'ring', 'token_ring'])
def test_context_attention_matches_single_device(impl, n, causal, reference):
  _check(impl, n, causal, reference)


@pytest.mark.parametrize('impl', ['ring', 'token_ring'])
def test_sliding_window(impl, reference):
  _check(impl, 4, True, reference, window=12)


def test_auto_picks_token_ring_for_mha_and_matches(reference):
  assert cost.choose(data.H, data.H, data.D, 4, full_duplex=True) == 'token_ring'
  assert cost.choose(data.H, data.K, data.D, 4, full_duplex=True) == 'ring'
  _check('auto', 4, True, reference, mha=True)


def test_step_time_model_winners():
  """max(compute, each link direction): TokenRing only for MHA on a switch at short local
  lengths; ties (compute-bound) go by bytes; ring on a torus (multi-hop returns) and for GQA."""
  gpu, tpu = cost.DEFAULT_HARDWARE['gpu'], cost.DEFAULT_HARDWARE['tpu']
  pick = lambda K, T, hw, duplex=True: cost.choose(32, K, 128, 2, full_duplex=duplex, tokens=T,
                                                   n=8, hw=hw)
  assert pick(32, 512, gpu) == 'token_ring' and pick(32, 2048, gpu, duplex=False) == 'token_ring'
  assert pick(8, 512, gpu) == 'ring' and pick(8, 8192, gpu) == 'ring'
  assert pick(32, 2048, tpu) == 'ring'
  assert cost.return_hops(8, switched=False) == pytest.approx(16 / 7)
  t = lambda impl, T: cost.step_time(impl, 32, 8, 128, 2, tokens=T, n=8, full_duplex=True,
                                     hw=gpu)
  compute = lambda T: 3.5 * 2 * T * T * 32 * 128 / gpu.flops_per_s
  assert t('ring', 8192) == pytest.approx(compute(8192))  # transfers hidden under compute
  assert t('ring', 512) > compute(512)                    # communication-bound


def test_kv_heads_fewer_than_tensor_shards(reference):
  """K=2 kv heads over tensor=4: K/V are copied per query head before sharding."""
  _check('ring', 2, True, reference, mesh_extra={'tensor': 4})


def test_zigzag_layout_round_trip_and_balance():
  x = np.arange(2 * 32).reshape(2, 32)
  z = layout.to_zigzag(x, 4)
  assert list(z[0, :8]) == [0, 1, 2, 3, 28, 29, 30, 31]  # device 0: chunks 0 and 7
  np.testing.assert_array_equal(layout.from_zigzag(z, 4), x)
  L = 1024
  seg, pos = np.ones((1, L), np.int32), np.arange(L)[None]
  for n in (2, 4, 8):
    kw = {'heads': 1, 'head_dim': 1, 'block': 32}
    zig = balance.imbalance(balance.attention_flops(seg, layout.to_zigzag(pos, n), n, **kw))
    tok = balance.imbalance(balance.attention_flops(seg, layout.to_zigzag(pos, n), n,
                                                    owner='key', **kw))
    contiguous = balance.imbalance(balance.attention_flops(seg, pos, n, **kw))
    assert zig <= 1.05 and tok <= 1.05
    assert contiguous >= {2: 1.4, 4: 1.7, 8: 1.8}[n]
  with pytest.raises(ValueError, match='seq_len=30 is not divisible'):
    layout.zigzag_order(30, 4)


def test_unknown_impl_is_a_clear_error():
  c = _config('rings', 8)
  with pytest.raises(ValueError, match="parallelism.context_impl='rings'"):
    make_context_attend(c, mesh_lib.make_mesh(c.mesh))


# ------------------------------------------------------------------ training runs

SEQ, BATCH, VOCAB = 32, 4, 64


def _train_config(impl: str, **mesh):
  c = base.get_config()
  c.steps, c.seq_len, c.batch_size = 3, SEQ, BATCH
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = 2, 32, 4, 2, 8
  m.mlp_dim, m.vocab_size, m.scan_layers = 64, VOCAB, True
  c.optimizer.warmup_steps = 1
  c.mesh.data = c.mesh.fsdp = c.mesh.context = c.mesh.tensor = 1
  for k, v in mesh.items():
    setattr(c.mesh, k, v)
  c.parallelism.context_impl = impl
  c.attention.block_q = c.attention.block_kv = 4
  c.attention.loss_chunk = 16
  # Parameters sharded over fsdp and context together.
  c.parallelism.rules = tuple((name, ('fsdp', 'context')) if name == 'embed' else (name, axes)
                              for name, axes in c.parallelism.rules)
  return c


def _batches(c):
  # Packed documents and trailing padding (segment 0, position 0) as the real pipeline makes:
  # the zigzag TokenRing's static halves assume index order within a segment, which padding
  # breaks, but padding has no targets and only padding attends to it, so training is exact.
  return [helpers.random_batch(c, seed=i) for i in range(3)]


def _train(c, devices, state=None):
  program = build_program(c, mesh_lib.make_mesh(c.mesh, devices))
  # The step donates its state: train on a copy, so a shared initial state stays usable.
  state = program.init_state() if state is None else jax.tree.map(jnp.copy, state)
  losses = []
  for b in _batches(c):
    state, metrics = program.train_step(state, program.global_batch(b))  # zigzag if context
    losses.append(float(metrics['loss']))
  return np.array(losses), jax.device_get(state.params)


@pytest.fixture(scope='module')
def single_device_run():
  c = _train_config('none')
  c.attention.loss_chunk = 0
  return _train(c, jax.devices()[:1])


@pytest.fixture(scope='module')
def initial_state():
  """One initialisation on mesh (data=2, context=4) for every implementation: the parameter
  shardings do not depend on the attention implementation."""
  c = _train_config('ring', data=2, context=4)
  return build_program(c, mesh_lib.make_mesh(c.mesh)).init_state()


@pytest.mark.parametrize('impl', ['allgather', 'ring', 'token_ring'])
def test_training_run_matches_single_device(impl, single_device_run, initial_state):
  ref_losses, ref_params = single_device_run
  losses, params = _train(_train_config(impl, data=2, context=4), jax.devices(),
                             initial_state)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_live_fraction_of_each_schedule():
  """bench_context's executed block pairs: allgather's tiles are fitted to the zigzag chunk,
  so it skips masked pairs like the rings (0.53 of the area with 16 x 16 chunks, not 1.0)."""
  from scripts import bench_context
  L, n = 2048, 8
  single = bench_context.live_fraction('blockwise', L, n)
  assert single == pytest.approx(10 / 16)  # 4 x 4 blocks of 512, causal
  for impl in ('allgather', 'ring', 'token_ring'):
    assert bench_context.live_fraction(impl, L, n) == pytest.approx(136 / 256), impl


def test_bench_context_help():
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.run([sys.executable, 'scripts/bench_context.py', '--help'], cwd=root,
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 0 and '--ratio_length' in run.stdout and '--tiny' in run.stdout
