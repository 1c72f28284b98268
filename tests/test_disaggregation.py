"""Core-attention disaggregation (DistCA, arXiv 2510.18121): planner and dispatch.

8 fake CPU devices, float32. The planner conserves tokens and FLOPs and brings every device
within tolerance; the disaggregated attention equals packed-document causal attention on one
device (outputs within 1e-5, dq/dk/dv within 1e-4) on random long-tail document mixes; a
3-step training run on 8 data-parallel devices equals the single-device run. The CLI path
(`training.loop.run`: telemetry compiles the step at start-up from `abstract_batch()`, the
held-out eval runs planned batches, the final checkpoint) against one device, for every family,
is the disaggregated column of tests/test_matrix.py.
"""


import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import base
from modeling import blockwise
from modeling.attention import xla_attention
from modeling.runtime import self_attention_kwargs
from modeling.kernels import BlockKernel
from parallelism import disaggregation as dca
from parallelism import disaggregation_attend
from parallelism import mesh as mesh_lib
from parallelism import rules as rules_lib
from training import step as step_lib
from training.composition import make_runtime
from training.state import init_train_state, setup_model

N = 8
B, L, H, K, D = 16, 32, 4, 2, 8   # 2 rows per device: 2 nano-batches of one row


def long_tail_batch(seed: int, B=B, L=L, n_long: int = 2):
  """Packed rows: `n_long` rows hold one long document, the rest many short ones + padding."""
  r = np.random.RandomState(seed)
  seg = np.zeros((B, L), np.int32)
  long_rows = r.choice(B, n_long, replace=False)
  for b in range(B):
    if b in long_rows:
      seg[b, :L - r.randint(0, 3)] = 1
      continue
    t, s = 0, 1
    while t < L:
      n = min(r.randint(1, max(2, L // 5)), L - t)
      seg[b, t:t + n] = s if r.rand() > 0.1 or t == 0 else 0  # some padding runs
      t, s = t + n, s + 1
  pos = np.zeros_like(seg)
  for t in range(1, L):
    pos[:, t] = np.where(seg[:, t] == seg[:, t - 1], pos[:, t - 1] + 1, 0)
  return seg, pos


def _config(**mesh):
  c = base.get_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.context, c.mesh.tensor = N, 1, 1, 1
  for k, v in mesh.items():
    setattr(c.mesh, k, v)
  c.parallelism.context_impl = 'disaggregated'
  return c


# ------------------------------------------------------------------ planner

PLAN_L, PLAN_BLOCK = 512, 32  # numpy only: rows long enough that whole blocks reach 5%


def _plan(seg, pos, tolerance=0.02, q_capacity=1.0, kv_capacity=4.0, block=PLAN_BLOCK):
  return dca.plan_batch(seg, pos, N, nano_batches=2, tolerance=tolerance, block_q=block,
                        block_kv=block, q_capacity=q_capacity, kv_capacity=kv_capacity)


def _live_pairs(qseg, kseg, qpos, kpos, block):
  return int(blockwise.block_table(qseg, kseg, qpos, kpos, causal=True, window=0,
                                   block_q=block, block_kv=block, per_row=True, xp=np).sum())


@pytest.mark.parametrize('seed', range(4))
def test_planner_conserves_balances_and_counts_what_executes(seed):
  L, bl = PLAN_L, PLAN_BLOCK
  seg, pos = long_tail_batch(seed, L=L)
  plan, scheds = _plan(seg, pos)
  T = L  # one row per device and nano-batch
  for a, s in enumerate(scheds):
    assert s.work_after.sum() == s.work_before.sum()      # block pairs move, none appear
    assert s.flops_after.sum() == s.flops_before.sum()
    true = dca.causal_pairs(seg, pos).reshape(N, 2, L)[:, a].sum(-1)
    np.testing.assert_array_equal(s.flops_before, true)
    for d in range(N):
      p = {k[len(dca.PREFIX):]: v[d, a] for k, v in plan.items()}
      rows = slice(d * 2 + a, d * 2 + a + 1)
      # What the kernel executes on this device = the plan's work: own rows (moved query
      # blocks dead) + the received blocks as one row.
      own = _live_pairs(p['own_qseg'][None], seg[rows], pos[rows], pos[rows], bl)
      srv = _live_pairs(p['q_seg'][None], p['kv_seg'][None], p['q_pos'][None],
                        p['kv_pos'][None], bl)
      assert own + srv == s.work_after[d]
      # Every own query answered once: kept (not moved) or returned from one server.
      kept = p['ret'] < T
      assert np.all(p['own_qseg'][kept] >= 0) and np.all(p['own_qseg'][~kept] == dca.MOVED_Q)
      assert len(np.unique(p['ret'])) == T
      # Route tables agree: the chunks d sends = the rows its buffer holds for each destination.
      np.testing.assert_array_equal(p['q_counts'], s.q_blocks)
      np.testing.assert_array_equal(p['kv_counts'], s.kv_blocks)
  before, after = dca.device_work(scheds)
  assert before.max() / before.mean() >= 1.3
  assert after.max() / after.mean() <= 1.05
  assert after.mean() == before.mean()


def test_capacity_limits_the_moves():
  seg, pos = long_tail_batch(0, L=PLAN_L)
  _, scheds = _plan(seg, pos, q_capacity=0.07, kv_capacity=0.07)
  cap = dca.capacities(PLAN_L, 0.07, 0.07, PLAN_BLOCK, PLAN_BLOCK)
  for s in scheds:
    for blocks, c in zip((s.q_blocks, s.kv_blocks), cap):
      assert blocks.sum(1).max() <= c and blocks.sum(0).max() <= c
  _, free = _plan(seg, pos)
  assert max(s.work_after.max() for s in scheds) > max(s.work_after.max() for s in free)


def test_exchange_bytes_are_the_planned_rows():
  seg, pos = long_tail_batch(1, L=PLAN_L)
  _, scheds = _plan(seg, pos)
  b = dca.exchange_bytes(scheds, q_row_bytes=3.0, kv_row_bytes=5.0)
  want = sum(s.q_blocks.sum(1) * PLAN_BLOCK * 3 + s.kv_blocks.sum(1) * PLAN_BLOCK * 5 +
             s.q_blocks.sum(0) * PLAN_BLOCK * 3 for s in scheds)
  np.testing.assert_allclose(b['per_device'], want)


def test_ragged_exchange_moves_planned_rows_and_back():
  """parallelism/ragged.py (permute form): rows land where the route says, unwritten rows are
  zero, and the VJP carries cotangents back to the rows they came from."""
  from parallelism import ragged
  mesh = jax.make_mesh((N,), ('x',))
  r = np.random.RandomState(0)
  # Pair sizes that need every piece size (16, 4, 1 chunks) and empty pairs.
  counts = r.randint(0, 22, (N, N)) * (1 - np.eye(N, dtype=int)) * (r.rand(N, N) < 0.3)
  counts[0, 1] = 21
  c = 2
  rows, out = counts.sum(1).max() * c + 4, counts.sum(0).max() * c + 6
  route = dca._route(counts, c, '')
  x = r.randn(N * rows, 3).astype(np.float32)
  w = r.randn(N * out, 3).astype(np.float32)
  sh = NamedSharding(mesh, P('x'))

  def f(x, rt):
    rt = ragged.Route(**{k: v[0] for k, v in rt.items()})
    return ragged.exchange(x, rt, 'x', N, out, c, 'permute')

  g = jax.shard_map(f, mesh=mesh, in_specs=(P('x'), P('x')), out_specs=P('x'), check_vma=False)
  route = {k: jax.device_put(v, sh) for k, v in route.items()}
  xs = jax.device_put(x, sh)
  y = np.asarray(jax.jit(g)(xs, route))
  gx = np.asarray(jax.jit(jax.grad(lambda x: (g(x, route) * w).sum()))(xs))
  send, recv = dca._offsets(counts)
  ref, ref_g = np.zeros_like(y), np.zeros_like(x)
  for s in range(N):
    for e in range(N):
      k = counts[s, e] * c
      src = slice(s * rows + send[s, e] * c, s * rows + send[s, e] * c + k)
      dst = slice(e * out + recv[e, s] * c, e * out + recv[e, s] * c + k)
      ref[dst], ref_g[src] = x[src], w[dst]
  assert counts.sum() > 0
  np.testing.assert_array_equal(y, ref)
  np.testing.assert_array_equal(gx, ref_g)


def test_context_axis_is_a_clear_error():
  c = _config(data=4, context=2)
  with pytest.raises(ValueError, match='mesh.context=1'):
    make_runtime(c, mesh_lib.make_mesh(c.mesh))


def test_grad_accumulation_is_a_clear_error():
  c = _config()
  c.optimizer.grad_accum_steps = 2
  with pytest.raises(ValueError, match='optimizer.grad_accum_steps=1'):
    make_runtime(c, mesh_lib.make_mesh(c.mesh))


def test_missing_plan_is_a_clear_error():
  c = _config()
  c.attention.block_q = c.attention.block_kv = 8
  attend = disaggregation_attend.make_attend(c, mesh_lib.make_mesh(c.mesh),
                                             BlockKernel('blockwise', 8, 8))
  seg, pos = long_tail_batch(0)
  q, k, v = _qkv()
  with pytest.raises(ValueError, match='attn_plan'):
    attend(q, k, v, causal=True, **self_attention_kwargs(seg, pos))


# ------------------------------------------------------------------ attention

def _qkv(seed=0):
  r = np.random.RandomState(seed)
  return (r.randn(B, L, H, D).astype(np.float32), r.randn(B, L, K, D).astype(np.float32),
          r.randn(B, L, K, D).astype(np.float32))


WEIGHTS = np.sin(np.arange(H * D) + 1.0).reshape(H, D).astype(np.float32)


def _value_and_grads(attend):
  def loss(q, k, v, seg, pos, plan):
    o = attend(q, k, v, causal=True,
               **self_attention_kwargs(seg, pos, dca.plan_of(plan)))
    return (o * WEIGHTS).sum(), o
  return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))


# The compiled programs run on 4 of the 8 devices: the exchange switches over every
# (source, destination) pair, so compile time grows with n^2 (8 devices: ~2.5x longer).
RUN = 4


@pytest.fixture(scope='module')
def programs():
  c = _config(data=2, fsdp=2)   # batch over two mesh axes: the exchange spans both
  c.attention.block_q = c.attention.block_kv = 8
  mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:RUN])
  attend = disaggregation_attend.make_attend(c, mesh, BlockKernel('blockwise', 8, 8))
  return {'dca': _value_and_grads(attend), 'reference': _value_and_grads(xla_attention),
          'config': c}


@pytest.mark.parametrize('seed', range(3))
def test_disaggregated_attention_matches_single_device(seed, programs):
  ref_fn, c = programs['reference'], programs['config']
  dca_fn = programs['dca']
  seg, pos = long_tail_batch(seed)
  q, k, v = _qkv(seed)
  plan, scheds = dca.plan_batch(seg, pos, RUN, **dca.planner_kwargs(c))
  assert any(s.moves for s in scheds)  # work really moves
  (_, o_ref), g_ref = ref_fn(q, k, v, seg, pos, {})
  (_, o), g = dca_fn(q, k, v, seg, pos, plan)
  np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=0)
  for a, b, name in zip(g, g_ref, 'qkv'):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=f'd{name}')


def test_non_blockwise_kernel_is_a_clear_error():
  c = _config()
  with pytest.raises(ValueError, match="attention.impl='blockwise'"):
    disaggregation_attend.make_attend(c, mesh_lib.make_mesh(c.mesh), BlockKernel('xla'))


# ------------------------------------------------------------------ training runs

VOCAB = 64


def _train_config(impl: str, family: str = 'transformer', **mesh):
  c = base.get_config()
  c.steps, c.seq_len, c.batch_size = 3, L, B
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = 2, 32, 4, 2, 8
  m.mlp_dim, m.vocab_size, m.scan_layers = 64, VOCAB, True
  c.optimizer.warmup_steps = 1
  c.mesh.data, c.mesh.fsdp, c.mesh.context, c.mesh.tensor = 1, 1, 1, 1
  for k, v in mesh.items():
    setattr(c.mesh, k, v)
  c.parallelism.context_impl = impl
  c.attention.impl = 'blockwise'
  c.attention.block_q = c.attention.block_kv = 8
  m.name = 'cart' if family == 'cart' else 'transformer'
  if family == 'cart':    # prelude and coda are transformer Blocks (layer ping-pong), the
    m.cart.prelude_layers, m.cart.coda_layers, m.cart.loops = 1, 1, 2   # core is not
    m.scan_layers = False
  if family == 'kv_routing':  # routed layers read other layers' K/V: ping-pong in attention
    m.kv_routing.p = 0.5
  return c


def _batches():
  r = np.random.RandomState(1)
  out = []
  for i in range(3):
    seg, pos = long_tail_batch(10 + i)
    inputs = r.randint(1, VOCAB, (B, L)).astype(np.int32)
    targets = np.roll(inputs, -1, axis=1)
    targets[np.roll(seg, -1, axis=1) != seg] = -1
    targets[seg == 0] = -1
    targets[:, -1] = -1
    out.append({'inputs': inputs, 'targets': targets, 'segment_ids': seg, 'positions': pos})
  return out


def _train(c, devices, state=None, steps=3):
  mesh = mesh_lib.make_mesh(c.mesh, devices)
  runtime = make_runtime(c, mesh)
  setup = setup_model(c, mesh, runtime)
  if state is None:
    state = init_train_state(c, setup, runtime)
  b_sharding = rules_lib.named_sharding((B, L), ('batch', 'length'), c.parallelism.rules, mesh,
                                        'batch')
  step = jax.jit(step_lib.make_train_step(setup),
                 in_shardings=(setup.shardings, b_sharding),
                 out_shardings=(setup.shardings, NamedSharding(mesh, P())))
  host = dca.with_plan(c, mesh, lambda b: b)
  losses = []
  for b in _batches()[:steps]:
    batch = {k: jax.device_put(v, b_sharding) for k, v in host(b).items()}
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return np.array(losses), jax.device_get(state.params)


def test_training_run_matches_single_device():
  ref_losses, ref_params = _train(_train_config('none'), jax.devices()[:1])
  losses, params = _train(_train_config('disaggregated', data=RUN), jax.devices()[:RUN])
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_telemetry_reports_executed_and_modelled_figures():
  import types
  from training.metrics.telemetry import DisaggregatedTelemetry
  c = _config()
  c.attention.block_q = c.attention.block_kv = 8
  mesh = mesh_lib.make_mesh(c.mesh)
  telemetry = DisaggregatedTelemetry(types.SimpleNamespace(
      config=c, mesh=mesh, planner=dca.Planner(c, mesh),
      setup=types.SimpleNamespace(graphdef=None)))
  seg, pos = long_tail_batch(0)
  telemetry.observe({'segment_ids': seg, 'positions': pos})
  row = telemetry.row(None, None)
  _, scheds = dca.plan_batch(seg, pos, N, **dca.planner_kwargs(c))
  before, after = dca.device_work(scheds)
  assert row['dca/executed_imbalance'] == pytest.approx(after.max() / after.mean())
  assert row['dca/executed_imbalance'] < row['dca/executed_imbalance_before']
  assert row['dca/executed_vs_dp'] == pytest.approx(1.0)   # moved, not added
  q_row, kv_row = dca.row_bytes(c)
  assert row['dca/bytes_sent_mean'] == pytest.approx(
      dca.exchange_bytes(scheds, q_row, kv_row)['mean'])
  assert row['dca/bytes_sent_mean'] > 0 and 'dca/modelled_imbalance' in row
  assert 0 < row['dca/q_buffer_use'] <= 1 and 0 < row['dca/kv_buffer_use'] <= 1


def test_exchange_self_check_catches_a_wrong_implementation(monkeypatch):
  """`ragged.verify` (run before training with `ragged`, which XLA:CPU cannot execute): it
  passes for the reference and refuses an exchange that drops a chunk."""
  from parallelism import ragged
  mesh = jax.make_mesh((RUN,), ('data',), devices=jax.devices()[:RUN])
  ragged.verify(mesh, 'data', 'permute')

  def wrong(x, route, axis, n, out_rows, chunk):
    y = ragged._permute(x, route, axis, n, out_rows, chunk)
    return y.at[:chunk].set(0)

  monkeypatch.setitem(ragged.__dict__, '_ragged', wrong)
  with pytest.raises(ValueError, match="parallelism.dca_exchange='permute'"):
    ragged.verify(mesh, 'data', 'ragged')


@pytest.mark.parametrize('family', ['cart', 'kv_routing'])
def test_other_families_match_single_device(family):
  """Layer ping-pong where a layer is a transformer Block with its own K/V, ping-pong inside
  attention elsewhere (CART's core, routed K/V): one step equals one device."""
  ref_losses, ref_params = _train(_train_config('none', family), jax.devices()[:1], steps=1)
  losses, params = _train(_train_config('disaggregated', family, data=RUN),
                          jax.devices()[:RUN], steps=1)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_the_same_batch_is_planned_once():
  c = _config()
  c.attention.block_q = c.attention.block_kv = 8
  planner = dca.Planner(c, mesh_lib.make_mesh(c.mesh))
  seg, pos = long_tail_batch(0)
  first = planner.plan(seg, pos)
  assert planner.plan(seg.copy(), pos.copy()) is first
  other = planner.plan(*long_tail_batch(1))
  assert other is not first
  np.testing.assert_array_equal(
      other[0]['dca_ret'],
      dca.plan_batch(*long_tail_batch(1), N, **dca.planner_kwargs(c))[0]['dca_ret'])


def test_abstract_batch_holds_the_plan_shapes():
  """Compile paths without a batch (telemetry, dry_run) trace the step with the plan's
  abstract arrays: the same keys, shapes and dtypes as a planned batch's."""
  c = _config()
  c.batch_size, c.seq_len = B, L
  c.attention.impl, c.attention.block_q, c.attention.block_kv = 'blockwise', 8, 8
  planner = dca.Planner(c, mesh_lib.make_mesh(c.mesh))
  seg, pos = long_tail_batch(0)
  plan, _ = planner.plan(seg, pos)
  abstract = planner.abstract(B, L)
  assert sorted(abstract) == sorted(plan)
  for k, v in plan.items():
    assert abstract[k] == (v.shape, v.dtype), k
