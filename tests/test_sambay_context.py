"""SambaY under a split sequence: the start-up guard for every family x strategy, the
distributed selective scan and conv halo against the sequential reference, the whole model on
context 2/4/8 (zigzag on/off, packed/unpacked) against one device, a training run on
(data=2, context=4), and hybrid DP with groups of 1, 2 and 4 devices."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base, sambay_tiny
from modeling import registry, ssm
from modeling.attention import self_attention_kwargs
from parallelism.hybrid import planner as hybrid_dp
from parallelism import mesh as mesh_lib
from parallelism.context import layout
from parallelism.context import scan as context_scan
from scripts import bench_context
from tests import attention_data, helpers
from training import composition
from training.hybrid import executor as hybrid_exec
from training.program import build_program
from training.state import setup_model

SEQ, BATCH, VOCAB = 64, 2, 64


def _config(name='sambay', context=1, impl='none', data=1, zigzag=True):
  c = sambay_tiny.get_config() if name == 'sambay' else base.get_config()
  c.seq_len, c.batch_size = SEQ, BATCH
  m = c.model
  m.num_layers = 8 if name == 'sambay' else 2
  m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 32, 4, 2, 8, 64
  m.vocab_size, m.init_std = VOCAB, 0.1
  m.sambay.window, m.sambay.scan_chunk = 6, 4
  if name == 'cart':
    m.name, m.cart.prelude_layers, m.cart.coda_layers, m.cart.loops = 'cart', 1, 1, 2
  if name == 'kv_routing':
    m.kv_routing.p = 0.5
  c.mesh.data, c.mesh.fsdp, c.mesh.context, c.mesh.tensor = data, 1, context, 1
  c.parallelism.context_impl, c.parallelism.zigzag = impl, zigzag
  c.attention.block_q = c.attention.block_kv = 4
  c.optimizer.warmup_steps = 1
  return c


def _mesh(c):
  n = c.mesh.data * c.mesh.context
  return mesh_lib.make_mesh(c.mesh, jax.devices()[:n])


# ------------------------------------------------------------------ the guard

FAMILIES = ('transformer', 'cart', 'kv_routing', 'sambay')
CONTEXT = [(impl, zz) for impl in ('ring', 'token_ring', 'allgather', 'auto')
           for zz in (True, False)]


@pytest.mark.parametrize('family', FAMILIES)
def test_every_family_and_strategy_runs_or_refuses(family):
  """Attention-only families follow any split (masks by positions; their exactness is tested
  in test_context / test_hybrid_dp / test_disaggregation); SambaY follows every context split
  and hybrid-DP groups (exactness below) and refuses disaggregation with the key to change."""
  for impl, zz in CONTEXT:
    c = _config(family, context=4, impl=impl, zigzag=zz)
    composition.check_token_order(c, _mesh(c))
    rec = composition.make_recurrence(c, _mesh(c))
    assert (rec is not None) == (family == 'sambay')
    if rec is not None:
      assert rec.zigzag == zz
  c = _config(family, data=8)
  c.parallelism.hybrid_dp.enabled = True
  c.parallelism.hybrid_dp.layouts = (1, 2, 4, 8)
  hybrid_exec.check_config(c, _mesh(c))
  assert hybrid_exec.whole_groups(c) == (family == 'sambay')
  c = _config(family, data=8, impl='disaggregated')
  if family == 'sambay':
    with pytest.raises(ValueError, match=r"model\.sambay\.window=6.*context_impl='ring'"):
      composition.make_runtime(c, _mesh(c))
  else:
    composition.check_token_order(c, _mesh(c))


def test_an_order_dependent_family_without_the_seam_is_refused(monkeypatch):
  fam = registry.FAMILIES['transformer']
  monkeypatch.setitem(registry.FAMILIES, 'orderly', registry.Family(
      fam.build, fam.forward_flops_per_token, order_dependent_layers=('conv',)))
  for impl, zz in [*CONTEXT, ('none', False)]:
    c = _config('transformer', context=4, impl=impl, zigzag=zz)
    c.model.name = 'orderly'
    with pytest.raises(ValueError, match=r"mesh\.context=4.*'orderly' has conv layers"):
      composition.make_runtime(c, _mesh(c))
  c = _config('transformer', context=1)
  c.model.name = 'orderly'
  composition.check_token_order(c, _mesh(c))   # nothing split: fine
  c = _config('transformer', data=8)
  c.model.name = 'orderly'
  c.parallelism.hybrid_dp.enabled = True
  c.parallelism.hybrid_dp.layouts = (1, 2)
  with pytest.raises(ValueError, match=r"'orderly' has conv.*hybrid_dp\.layouts=\(1,\)"):
    hybrid_exec.check_config(c, _mesh(c))
  c.parallelism.hybrid_dp.layouts = (1,)
  hybrid_exec.check_config(c, _mesh(c))


# ------------------------------------------------------------------ the scan alone

def _ragged(n, zigzag, seed):
  """Scan inputs whose segments start just before, at and after piece boundaries, with
  padding (segment 0) in the middle of a row."""
  r = np.random.default_rng(seed)
  Bsz, L, E, N = 2, 48, 6, 3
  x = r.standard_normal((Bsz, L, E)).astype(np.float32)
  dt = (0.3 * np.abs(r.standard_normal((Bsz, L, E)))).astype(np.float32)
  A = (-0.3 * np.exp(r.standard_normal((E, N)))).astype(np.float32)
  Bm, Cm = (r.standard_normal((Bsz, L, N)).astype(np.float32) for _ in range(2))
  seg = np.ones((Bsz, L), np.int32)
  piece = L // (n * (2 if zigzag else 1))
  seg[0, piece - 1:] = 2                 # a document starts one token before a boundary
  seg[0, 2 * piece:] = 3                 # ... exactly at one
  seg[0, 3 * piece + 1:] = 4             # ... one after one
  seg[1, L // 2:L // 2 + 3] = 0          # padding inside the row
  seg[1, L // 2 + 3:] = 5
  return x, dt, A, Bm, Cm, seg


@pytest.mark.parametrize('n,zigzag', [(2, False), (4, True), (8, True), (8, False)])
def test_distributed_scan_and_conv_equal_the_sequential_reference(n, zigzag):
  c = _config(context=n, impl='ring', zigzag=zigzag)
  rec = context_scan.ContextRecurrence(_mesh(c), c.parallelism.rules,
                                       ssm.make_scan('chunked', 4), zigzag, 4)
  x, dt, A, Bm, Cm, seg = _ragged(n, zigzag, seed=n)
  w = np.random.default_rng(1).standard_normal((4, x.shape[2])).astype(np.float32)
  b = np.random.default_rng(2).standard_normal(x.shape[2]).astype(np.float32)
  to = (lambda v: layout.to_zigzag(np.asarray(v), n)) if zigzag else np.asarray
  back = (lambda v: layout.from_zigzag(np.asarray(v), n)) if zigzag else np.asarray

  def split_loss(x, dt, A, Bm, Cm, w):
    y, h = rec.scan(x, dt, A, Bm, Cm, segment_ids_BL=to(seg))
    conv = rec.conv(x, w, b, to(seg))
    return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(conv)) + jnp.sum(h ** 2), (y, h, conv)

  def ref_loss(x, dt, A, Bm, Cm, w):
    y, h = ssm.sequential_scan(x, dt, A, Bm, Cm, reset_BL=ssm.segment_starts(seg))
    conv = ssm.causal_conv(x, w, b, seg)
    return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(conv)) + jnp.sum(h ** 2), (y, h, conv)

  argn = tuple(range(6))
  (_, (y, h, conv)), g = jax.jit(jax.value_and_grad(split_loss, argn, has_aux=True))(
      to(x), to(dt), A, to(Bm), to(Cm), w)
  (_, (ry, rh, rconv)), rg = jax.jit(jax.value_and_grad(ref_loss, argn, has_aux=True))(
      x, dt, A, Bm, Cm, w)
  np.testing.assert_allclose(back(y), ry, atol=1e-5)
  np.testing.assert_allclose(h, rh, atol=1e-5)
  np.testing.assert_allclose(back(conv), rconv, atol=1e-5)
  for name, a, e in zip(('x', 'dt', 'A', 'B', 'C', 'w'), g, rg):
    per_token = name in ('x', 'dt', 'B', 'C')
    np.testing.assert_allclose(back(a) if per_token else a, e, atol=1e-4, err_msg=name)


# ------------------------------------------------------------------ the whole model

def _batch(packed: bool, seed=0):
  c = _config()
  b = helpers.random_batch(c, seed=seed, num_docs=4) if packed else {
      'inputs': np.random.default_rng(seed).integers(0, VOCAB, (BATCH, SEQ), dtype=np.int32),
      'targets': np.random.default_rng(seed + 1).integers(0, VOCAB, (BATCH, SEQ),
                                                          dtype=np.int32),
      'segment_ids': np.ones((BATCH, SEQ), np.int32),
      'positions': np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1))}
  return b


def _loss_and_hidden(c, mesh):
  """A jitted (params, batch) -> ((loss, hidden states), grads) for config `c` on `mesh`."""
  runtime = composition.make_runtime(c, mesh)
  model = nnx.eval_shape(lambda: registry.build_model(c.model, rngs=nnx.Rngs(0),
                                                      runtime=runtime))
  graphdef = nnx.split(model, nnx.Param)[0]

  def loss(params, b):
    m = nnx.merge(graphdef, params)
    h = m(b['inputs'], segment_ids=b['segment_ids'], positions=b['positions'])
    logp = jax.nn.log_softmax(m.logits(h).astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, jnp.maximum(b['targets'], 0)[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(b['targets'] >= 0, nll, 0.0)) / SEQ, h

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope='module')
def reference():
  """Initial parameters (one compiled init), the single-device loss-and-gradient function, and
  its results on an unpacked and a packed batch."""
  c = _config()
  build = lambda: registry.build_model(c.model, rngs=nnx.Rngs(0))
  params = jax.jit(lambda: nnx.split(build(), nnx.Param)[1])()
  fn = _loss_and_hidden(c, _mesh(c))
  return params, fn, {packed: fn(params, _batch(packed)) for packed in (False, True)}


# Context 2 and 8 (zigzag) and 4 (contiguous), each on a packed and an unpacked batch; context 4
# with zigzag is the training run below, and the scan alone above covers the other pairs. The
# attention strategy is not what is tested here (test_context covers it), so the cheapest to
# compile, all-gather, serves; the training run uses the ring.
@pytest.mark.parametrize('n,zigzag', [(2, True), (4, False), (8, True)])
def test_sambay_on_a_split_sequence_equals_one_device(n, zigzag, reference):
  params, _, ref = reference
  c = _config(context=n, impl='allgather', zigzag=zigzag)
  mesh = _mesh(c)
  fn = _loss_and_hidden(c, mesh)
  assert isinstance(composition.make_runtime(c, mesh).recurrence,
                    context_scan.ContextRecurrence)
  for packed in (False, True):
    b = _batch(packed)
    if zigzag:
      b = {k: layout.to_zigzag(v, n) for k, v in b.items()}
    (loss, h), g = fn(params, b)
    (ref_loss, ref_h), ref_g = ref[packed]
    h = layout.from_zigzag(np.asarray(h), n) if zigzag else np.asarray(h)
    np.testing.assert_allclose(h, ref_h, atol=1e-5, err_msg=f'packed={packed}')
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(ref_g)):
      np.testing.assert_allclose(a, e, atol=1e-4,
                                 err_msg=f'packed={packed} {jax.tree_util.keystr(path)}')


def _train(c, devices, state=None):
  program = build_program(c, mesh_lib.make_mesh(c.mesh, devices))
  state = program.init_state() if state is None else state
  losses = []
  for seed in range(3):
    state, metrics = program.train_step(state, program.global_batch(
        helpers.random_batch(c, seed=seed, num_docs=3)))   # zigzag on the (2, 4) mesh
    losses.append(float(metrics['loss']))
  return np.array(losses), jax.device_get(state.params)


def test_three_training_steps_on_data2_context4_equal_one_device():
  # 4 layers (Mamba, window attention, memory Mamba, full attention) keep the two train-step
  # compilations cheap; the cross-decoder is covered above.
  ref_c, c = _config(), _config(data=2, context=4, impl='ring')
  ref_c.model.num_layers = c.model.num_layers = 4
  ref_losses, ref_params = _train(ref_c, jax.devices()[:1])
  losses, params = _train(c, jax.devices())
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_hybrid_dp_with_groups_of_2_and_4_equals_one_device(reference):
  """layouts=(1, 2, 4) on a pool of 8: a document split over 4 devices (its end, a segment
  boundary, inside a piece), one over 2, and whole documents; the groups run the context scan,
  conv halo, window and shared-K/V attention over the group ring. The summed gradient equals
  one device's on the same documents packed into rows."""
  params, ref_fn, _ = reference
  C = 16
  c = _config(data=8)
  h = c.parallelism.hybrid_dp
  h.enabled, h.capacity, h.layouts = True, C, (1, 2, 4)
  mesh = _mesh(c)
  setup = setup_model(c, mesh, composition.make_runtime(c, mesh))
  ex = hybrid_exec.Executor(c, mesh, setup)
  assert ex.whole_groups
  r = np.random.default_rng(5)
  lengths = (50, 27, 9, 5)
  docs = [r.integers(0, VOCAB, s).astype(np.int32) for s in lengths]
  plan = hybrid_dp.plan(lengths, ex.pool, C, layouts=h.layouts, whole_groups=True)
  micro = hybrid_dp.batch_buffers(plan, docs)
  assert plan.layouts_used == (1, 2, 4)
  split = [b['segment_ids'][:4] for g, b in micro if g == 4][0]
  assert (split > 0).sum() == 50 and (split == 0).any(axis=1).sum() >= 1
  assert ((split[:, :C // 2] > 0) & (split[:, C // 2:] > 0)).any()   # pieces on both halves
  with pytest.raises(ValueError, match='whole_groups=True'):   # the other layout is refused
    ex.gradients(params, jax.random.PRNGKey(0), hybrid_dp.batch_buffers(
        hybrid_dp.plan(lengths, ex.pool, C, layouts=h.layouts), docs))
  total, count, grads = ex.gradients(params, jax.random.PRNGKey(0), micro)
  # One device: (50, 9) and (27, 5) packed into the reference's two rows of SEQ.
  rows = {k: np.zeros((BATCH, SEQ), np.int32) for k in hybrid_dp.FIELDS}
  rows['targets'][:] = -1
  for row, pair in enumerate([(0, 2), (1, 3)]):
    at = 0
    for seg, i in enumerate(pair, start=1):
      d, sl = docs[i], slice(at, at + len(docs[i]))
      rows['inputs'][row, sl], rows['segment_ids'][row, sl] = d, seg
      rows['targets'][row, at:at + len(d) - 1] = d[1:]
      rows['positions'][row, sl] = np.arange(len(d))
      at += len(d)
  (ref_loss, _), ref_grads = ref_fn(params, rows)
  assert float(count.sum()) == sum(s - 1 for s in lengths)
  np.testing.assert_allclose(float(total.sum()), float(ref_loss) * SEQ, rtol=1e-5)
  worst = 0.0
  for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(grads),
                          jax.tree.leaves(ref_grads)):
    a, e = np.asarray(a).sum(0), np.asarray(e) * SEQ
    err = np.abs(a - e).max() / np.abs(e).max()
    assert err <= 1e-5, (jax.tree_util.keystr(path), err)
    worst = max(worst, err)
  print(f'hybrid DP (1, 2, 4) vs one device: loss sum {float(total.sum()):.6f} vs '
        f'{float(ref_loss) * SEQ:.6f}, worst leaf max|dg|/max|g| {worst:.2e}')


# ------------------------------------------------------------------ window attention

def _window_fn(n, zigzag, window, impl='ring'):
  c = _config(context=n, impl=impl, zigzag=zigzag)
  c.attention.impl = 'xla'
  attend = composition.make_attend(c, _mesh(c))

  def loss(q, k, v, seg, pos):
    o = attend(q, k, v, causal=True, window=window, **self_attention_kwargs(seg, pos))
    return (o * attention_data.head_weights()).sum(), o

  return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))


def test_window_attention_takes_one_hop_and_equals_one_device(caplog):
  caplog.set_level(logging.INFO, logger='parallelism.context.window')
  window = 6
  ref = _window_fn(1, False, window, impl='none')
  for n, zigzag in [(4, True), (8, False)]:
    fn = _window_fn(n, zigzag, window)
    to = (lambda x, n=n: layout.to_zigzag(x, n)) if zigzag else (lambda x: x)
    back = (lambda x, n=n: layout.from_zigzag(np.asarray(x), n)) if zigzag else np.asarray
    for packed in (False, True):
      args = (*attention_data.qkv(), *attention_data.segments(packed))
      (_, o), g = fn(*(to(x) for x in args))
      (_, o_ref), g_ref = ref(*args)
      np.testing.assert_allclose(back(o), o_ref, atol=1e-5, err_msg=f'n={n} packed={packed}')
      for name, a, e in zip('qkv', g, g_ref):
        np.testing.assert_allclose(back(a), e, atol=1e-4, err_msg=f'd{name} n={n}')
  # The one-hop path was taken (logged at trace time); its bytes do not grow with the context.
  assert 'one-hop halo of 5 tokens per piece of 8' in caplog.text
  sent = {}
  for n in (4, 8):   # (with 2 devices one sends only K/V, the other only their gradients)
    args = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in
            (*attention_data.qkv(), *attention_data.segments(False))]
    hlo = _window_fn(n, False, window).lower(*args).compile().as_text()
    sent[n] = bench_context.collective_bytes_per_device(hlo, n).max()
  # 5 tokens of K/V (and their dK/dV back) per device at both sizes (a ring's would double).
  assert sent[4] > 0 and abs(sent[8] - sent[4]) <= 0.01 * sent[4], sent


# ------------------------------------------------------------------ the benchmark's smoke run

def test_bench_sambay_context_smoke(tmp_path, capsys):
  from scripts import bench_sambay_context as bench
  with pytest.raises(SystemExit):
    bench.main(['--help'])
  path = tmp_path / 'r.json'
  bench.main(['--smoke', '--json', str(path)])
  r = json.loads(path.read_text())
  assert 'scan summaries' in capsys.readouterr().out
  assert r['context'] == 4 and r['memory_bytes']['ratio'] is None   # not compiled in smoke
  layer, step = r['bytes_per_device_per_layer'], r['bytes_per_device_per_step']
  assert 0 < layer['scan_summaries'] and 0 < layer['segment_halo'] and 0 < layer['conv_halo']
  assert 0 < layer['window_handoff'] < layer['window_via_ring']
  assert 0 < step['shared_kv_once']
  assert layer['scan_summaries'] + layer['conv_halo'] < layer['dense_ring_kv']
