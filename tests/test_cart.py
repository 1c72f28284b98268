"""CART (modeling/cart.py): causality at every R, weight tying, init parity with the reference,
variable R against an explicit unroll, ablation switches, the attention seam, sharding and
one training step. Tiny shapes: d=32, 2 query heads sharing 1 K/V head, seq 16."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import base
from modeling import cart, mla, registry
from modeling.attention import xla_attention
from modeling.runtime import Runtime

B, L, V = 2, 16, 64
SEG = jnp.ones((B, L), jnp.int32)
POS = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
TOKENS = jax.random.randint(jax.random.PRNGKey(7), (B, L), 0, V)


def model_config(**cart_keys) -> ml_collections.ConfigDict:
  m = base.get_config().model
  m.name = 'cart'
  m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim, m.vocab_size = 32, 2, 1, 16, 64, V
  m.cart.prelude_layers = 1
  m.cart.coda_layers = 1
  m.cart.loops = 2
  for k, v in cart_keys.items():
    m.cart[k] = v
  return m


def build(m, seed=0, runtime=None):
  return registry.build_model(m, rngs=nnx.Rngs(seed), runtime=runtime or Runtime())


def split(model):
  return nnx.split(model, nnx.Param)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def logits_fn(graphdef, params, tokens, loops, training=False):
  model = nnx.merge(graphdef, params)
  rng = jax.random.PRNGKey(0) if training else None
  h = model(tokens, segment_ids=SEG, positions=POS, rng=rng, loops=loops)
  return model.logits(h)


def run(model, tokens=TOKENS, loops=None, training=False):
  g, p = split(model)
  return np.asarray(logits_fn(g, p, tokens, loops, training))


def lm_loss(params, graphdef, tokens):
  model = nnx.merge(graphdef, params)
  h = model(tokens, segment_ids=SEG, positions=POS, rng=jax.random.PRNGKey(0))
  logp = jax.nn.log_softmax(model.logits(h)[:, :-1])
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


# One jitted gradient, shared by every test (compiled once per model structure).
loss_and_grad = jax.jit(jax.value_and_grad(lm_loss), static_argnums=1)


@functools.partial(jax.jit, static_argnums=(0, 3))
def logits_at_each(graphdef, params, tokens, loops):
  """Logits for each R in `loops`, in one compiled program."""
  model = nnx.merge(graphdef, params)
  return [model.logits(model(tokens, segment_ids=SEG, positions=POS, loops=R)) for R in loops]


@pytest.fixture(scope='module')
def base_model():
  return build(model_config())


# --- causality: the leak the paper warns about -------------------------------------------

def _future_changed(t):
  tokens = np.array(TOKENS)
  tokens[1] = tokens[0]
  tokens[1, t + 1:] = (tokens[1, t + 1:] + 1) % V   # row 1 differs from row 0 only after t
  return jnp.asarray(tokens)


@pytest.mark.parametrize('variant', [{}, {'recompute_kv': True}, {'shared_core': False}])
def test_causal_at_every_R(variant):
  t = 6
  model = build(model_config(loops=4, **variant))
  g, p = split(model)
  for R, out in zip(range(1, 5), logits_at_each(g, p, _future_changed(t), tuple(range(1, 5)))):
    out = np.asarray(out)
    np.testing.assert_array_equal(out[0, :t + 1], out[1, :t + 1], err_msg=f'R={R} leaks')
    assert not np.allclose(out[0, t + 1:], out[1, t + 1:]), 'the change after t must matter'


def _noncausal(q, k, v, *, causal, **kw):
  del causal
  return xla_attention(q, k, v, causal=False, **kw)


def test_core_goes_through_the_seam_and_the_check_has_teeth():
  """Every attention (prelude, R core applications, coda) goes through runtime.attend with
  causal=True; a core that ignores `causal` (the paper's bug) fails the causality check."""
  calls = []

  def recording(q, k, v, *, causal, **kw):
    calls.append((causal, kw['q_positions'] is kw['kv_positions']))
    return xla_attention(q, k, v, causal=causal, **kw)

  m = model_config(loops=2)
  model = build(m, runtime=Runtime(attend=recording))
  jax.eval_shape(lambda: model(TOKENS, segment_ids=SEG, positions=POS))
  assert calls == [(True, True)] * (1 + 2 + 1), calls
  t = 6
  tokens = _future_changed(t)
  leaky = build(m)
  leaky.core.runtime = Runtime(attend=_noncausal)   # only the core leaks
  out = run(leaky, tokens)
  assert not np.array_equal(out[0, :t + 1], out[1, :t + 1])


# --- weight tying ------------------------------------------------------------------------

def test_stored_count_independent_of_R():
  counts = {R: cart.parameter_counts(model_config(loops=R)) for R in (1, 3, 6, 10)}
  stored = {s for s, _ in counts.values()}
  assert len(stored) == 1, counts
  model = build(model_config())
  core = sum(x.size for x in jax.tree.leaves(nnx.state(model.core, nnx.Param)))
  total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert stored == {total}
  for R, (s, eff) in counts.items():
    assert eff == s + (R - 1) * core
  kv = sum(x.size for x in jax.tree.leaves(nnx.state(model.kv_proj, nnx.Param)))
  s, eff = cart.parameter_counts(model_config(loops=3, recompute_kv=True))
  assert (s, eff) == (total, total + 2 * (core + kv))   # K/V projection applied R times too
  s, eff = cart.parameter_counts(model_config(loops=3, shared_core=False))
  assert s == eff == total + 2 * core


def test_flops_count_every_core_application():
  """forward_flops_per_token = 2 x matmul parameters (read off the model) + attention, with the
  core's parameters and attention counted once per application."""
  m = model_config(loops=6)
  model = build(m)
  count = lambda mod: sum(x.size for x in jax.tree.leaves(nnx.state(mod, nnx.Param)))
  D, P, C = m.d_model, m.cart.prelude_layers, m.cart.coda_layers
  norms = (2 * P + 2 + 2 * C + 1) * D + (P + C) * mla.latent_dim(m)   # + MLA's latent norms
  matmul_one = count(model) - norms - count(model.glue)   # the tied table is the head
  attn = 4 * L * m.num_heads * m.head_dim * 0.5                      # causal, per layer
  core = count(model.core) - 2 * D
  expect = 2 * (matmul_one + 5 * core) + (P + C + 6) * attn
  assert cart.forward_flops_per_token(m, L) == pytest.approx(expect)
  m1 = model_config(loops=1)
  assert (cart.forward_flops_per_token(m, L) - cart.forward_flops_per_token(m1, L)
          == pytest.approx(5 * (2 * core + attn)))


def test_core_gradient_is_sum_over_unrolled_copies():
  """The shared core's gradient equals the sum over an unrolled model's R tied copies (the
  unshared-core model fed the same parameters in every copy)."""
  R = 2
  shared = build(model_config(loops=R))
  unrolled = build(model_config(loops=R, shared_core=False), seed=1)
  gs, ps = split(shared)
  gu, pu = split(unrolled)
  pu = nnx.to_pure_dict(pu)
  ps_dict = nnx.to_pure_dict(ps)
  for key in ps_dict:
    if key != 'core':
      pu[key] = ps_dict[key]
  pu['core'] = {i: ps_dict['core'] for i in range(R)}
  loss_s, g_s = loss_and_grad(ps_dict, gs, TOKENS)
  loss_u, g_u = loss_and_grad(pu, gu, TOKENS)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
  summed = jax.tree.map(lambda *xs: sum(xs), *[g_u['core'][i] for i in range(R)])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               g_s['core'], summed)
  for key in ps_dict:
    if key != 'core':
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                   g_s[key], g_u[key])


# --- init parity with the reference ------------------------------------------------------

def test_init_matches_reference(base_model):
  d = base_model.diagnostics()
  np.testing.assert_allclose(d['cart/spectral_radius'], 0.9, rtol=1e-6)
  expect = np.exp([1.0, 0.0, 0.0]) / np.exp([1.0, 0.0, 0.0]).sum()   # (0.576, 0.212, 0.212)
  got = [float(d[f'cart/hyper_weight_{i}']) for i in range(3)]
  np.testing.assert_allclose(got, expect, rtol=1e-6)
  np.testing.assert_allclose(base_model.glue.theta[...], [1.0, 0.0, 0.0])
  np.testing.assert_allclose(jax.nn.sigmoid(base_model.glue.a[...]), 0.9, rtol=1e-6)
  # Every linear map N(0, 0.02), output projections included (no depth scaling).
  big = build(model_config(), seed=3)
  for w in (big.prelude[0].attn.wo, big.prelude[0].mlp.w_down, big.core.wo, big.core.mlp.w_down,
            big.kv_proj.w_down, big.glue.w_lie, big.embed.table):
    assert abs(float(jnp.std(w[...])) - 0.02) < 0.003, w.shape


# --- variable R --------------------------------------------------------------------------

def explicit_unroll(model, tokens, R):
  """The note's recurrence written out with the model's own sub-modules."""
  c = model.cfg.cart
  e = model.anchor(tokens, segment_ids=SEG, positions=POS)
  k, v = model.kv_proj(e)
  rows = np.arange(c.max_loops)[:, None]
  div = np.exp(np.arange(0, c.loop_embed_dim, 2) * -(np.log(10000.0) / c.loop_embed_dim))
  pe = np.zeros((c.max_loops, c.loop_embed_dim))
  pe[:, 0::2], pe[:, 1::2] = np.sin(rows * div), np.cos(rows * div)
  w = jax.nn.softmax(model.glue.theta[...])
  buf = [e, e, e]
  for r in range(R):
    hh = w[0] * buf[0] + w[1] * buf[1] + w[2] * buf[2] + jnp.asarray(pe[r]) @ model.glue.w_lie[...]
    f = model.core(hh, k, v, segment_ids=SEG, positions=POS)
    h = jax.nn.sigmoid(model.glue.a[...]) * hh + f
    buf = [h, buf[0], buf[1]]
  return model.logits(model.finish(buf[0], segment_ids=SEG, positions=POS))


def test_other_R_matches_explicit_unroll(base_model):
  g, p = split(base_model)
  unroll = jax.jit(lambda p, R: explicit_unroll(nnx.merge(g, p), TOKENS, R), static_argnums=1)
  at5 = run(base_model, loops=5)                        # trained at R=2, run at R'=5
  np.testing.assert_allclose(at5, unroll(p, 5), rtol=2e-5, atol=2e-5)
  # Training uses cart.loops; eval (rng=None) uses cart.eval_loops (same seed: same params).
  np.testing.assert_allclose(run(base_model, training=True), unroll(p, 2), rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(run(build(model_config(eval_loops=5))), at5)


def test_R_beyond_table_is_a_clear_error(base_model):
  with pytest.raises(ValueError, match=r'model\.cart\.max_loops=16'):
    base_model.num_loops(training=False, loops=17)
  assert base_model.num_loops(training=False, loops=16) == 16
  with pytest.raises(ValueError, match=r'model\.cart\.max_loops'):
    build(model_config(eval_loops=17))(TOKENS, segment_ids=SEG, positions=POS)
  unshared = build(model_config(shared_core=False))
  with pytest.raises(ValueError, match=r'shared_core=False'):
    unshared.num_loops(training=False, loops=4)
  no_index = build(model_config(loop_embedding=False))
  assert no_index.num_loops(training=False, loops=40) == 40   # no table, no cap


# --- ablation switches -------------------------------------------------------------------

@pytest.mark.parametrize('switch, path, neutral', [
    ('hyper_connections', ('glue', 'theta'), jnp.array([1e4, 0.0, 0.0])),
    ('lti_gate', ('glue', 'a'), -1e4),
    ('loop_embedding', ('glue', 'w_lie'), 0.0),
])
def test_switch_off_equals_neutralised_parameter(base_model, switch, path, neutral):
  """Off removes the term and its parameter; it equals the on-model with that term zeroed
  (softmax -> [1,0,0], sigmoid(a) -> 0, W_lie -> 0)."""
  g_off, p_off = split(build(model_config(**{switch: False})))
  p_off = nnx.to_pure_dict(p_off)
  assert path[-1] not in p_off['glue']
  g, p = split(base_model)
  p = nnx.to_pure_dict(p)
  p['glue'][path[-1]] = jnp.zeros_like(p['glue'][path[-1]]) + neutral
  on = logits_fn(g, p, TOKENS, None)
  assert not np.allclose(on, run(base_model), atol=1e-4), 'the term must matter at init'
  # The off-model with the on-model's remaining parameters.
  p_off = jax.tree.map(lambda _, x: x, p_off, {k: {kk: vv for kk, vv in v.items()
                                                   if kk != path[-1]} if k == 'glue' else v
                                               for k, v in p.items()})
  np.testing.assert_allclose(logits_fn(g_off, p_off, TOKENS, None), on, rtol=1e-5, atol=1e-6)


def test_recompute_kv_reads_the_state():
  frozen, recompute = build(model_config()), build(model_config(recompute_kv=True))
  # Same parameters; only where K/V come from differs.
  assert jax.tree.structure(split(frozen)[1]) == jax.tree.structure(split(recompute)[1])
  assert not np.allclose(run(frozen), run(recompute), atol=1e-4)
  # At R=1 with every glue term neutralised, hh = e, so recomputing K/V from hh changes nothing.
  outs = []
  for m in (frozen, recompute):
    g, p = split(m)
    p = nnx.to_pure_dict(p)
    p['glue']['theta'] = jnp.array([1e4, 0.0, 0.0])
    p['glue']['w_lie'] = jnp.zeros_like(p['glue']['w_lie'])
    outs.append(logits_fn(g, p, TOKENS, 1))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_unshared_core_holds_R_blocks():
  model = build(model_config(loops=3, shared_core=False))
  assert len(model.core) == 3
  a, b = model.core[0].wq[...], model.core[1].wq[...]
  assert not np.allclose(a, b)


def test_remat_loop_changes_memory_not_values(base_model):
  remat = build(model_config(remat_loop='full'))
  g0, p0 = split(base_model)
  g1, _ = split(remat)
  p0 = nnx.to_pure_dict(p0)
  (l0, grad0), (l1, grad1) = loss_and_grad(p0, g0, TOKENS), loss_and_grad(p0, g1, TOKENS)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grad0, grad1)
  # One rematerialised region per core application (what XLA:GPU/TPU then recompute; XLA:CPU
  # expands the barriers and CSEs the recomputation away, see scripts/bench_cart_memory.py).
  def jaxpr(g):
    return str(jax.make_jaxpr(jax.grad(lm_loss), static_argnums=1)(p0, g, TOKENS))
  assert jaxpr(g1).count('remat') == 2 and 'remat' not in jaxpr(g0)
  with pytest.raises(ValueError, match=r'model\.cart\.remat_loop'):
    build(model_config(remat_loop='bogus'))


# --- training: sharded equals single-device, one step lowers the loss ---------------------

def train_config(**mesh):
  c = base.get_config()
  m = model_config()
  m.num_kv_heads = 2   # divisible by mesh.tensor=2
  c.model = m
  c.batch_size, c.seq_len, c.steps = 8, L, 10
  c.optimizer.lr, c.optimizer.schedule, c.optimizer.warmup_steps = 1e-2, 'constant', 0
  for k, v in mesh.items():
    c.mesh[k] = v
  return c


def batch_of(n):
  tokens = (np.arange(n * (L + 1)).reshape(n, L + 1) * 5) % V
  return {'inputs': jnp.asarray(tokens[:, :-1], jnp.int32),
          'targets': jnp.asarray(tokens[:, 1:], jnp.int32),
          'segment_ids': jnp.ones((n, L), jnp.int32),
          'positions': jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (n, L))}


def _setup(c, devices):
  from parallelism import mesh as mesh_lib
  from training.composition import make_runtime
  from training.state import setup_model
  mesh = mesh_lib.make_mesh(c.mesh, devices)
  setup = setup_model(c, mesh, make_runtime(c, mesh))
  host = nnx.to_pure_dict(split(build(c.model))[1])
  return mesh, setup, host, jax.device_put(host, setup.shardings.params)


def test_sharded_loss_and_grads_equal_single_device():
  from training import step as step_lib
  c = train_config(data=2, fsdp=2, tensor=2)
  mesh, setup, host, params = _setup(c, jax.devices())
  assert 'tensor' in str(params['core']['wq'].sharding.spec)
  batch, rng = batch_of(8), jax.random.PRNGKey(0)
  grad = jax.jit(jax.value_and_grad(step_lib.loss_sum, has_aux=True), static_argnums=1)
  with jax.set_mesh(mesh):
    (total, count), g = grad(params, setup.graphdef, batch, rng)
  (total1, count1), g1 = grad(host, split(build(c.model))[0], batch, rng)
  assert float(count) == float(count1) == 8 * L
  np.testing.assert_allclose(total, total1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, g1)


def test_one_train_step_lowers_the_loss_and_reports_rho():
  from training import step as step_lib
  from training.state import TrainState
  c = train_config(data=1)
  _, setup, _, params = _setup(c, jax.devices()[:1])
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=setup.tx.init(params), rng=jax.random.PRNGKey(1))
  train_step = jax.jit(step_lib.make_train_step(setup))
  batch = batch_of(8)
  state, first = train_step(state, batch)
  _, second = train_step(state, batch)   # its loss is measured before its own update
  before, after = float(first['loss']), float(second['loss'])
  assert after < before - 0.02, (before, after)
  rho = float(first['cart/spectral_radius'])   # after the first update (init: 0.9)
  assert 0.85 < rho < 0.95 and abs(rho - 0.9) > 1e-5, rho
