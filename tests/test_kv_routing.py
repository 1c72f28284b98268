"""Stochastic KV routing (modeling/kv_routing.py) and cache-plan decoding (modeling/decode.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

from configs import base
from modeling import decode, kv_routing, registry
from modeling.kv_routing import CachePlan, Routes

L = 4                 # layers
B, T = 8, 12          # batch (one row per device of the data=8 mesh), tokens


def model_config(**overrides):
  m = base.get_config().model
  m.update(num_layers=L, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
           vocab_size=64)
  for key, value in overrides.items():
    if key.startswith('kv_'):
      m.kv_routing[key[3:]] = value
    else:
      m[key] = value
  return m


def build(**overrides):
  return registry.build_model(model_config(**overrides), rngs=nnx.Rngs(0))


def like(model, **overrides):
  """`model`'s parameters under another config (stacked per layer when scan_layers)."""
  cfg = model_config(**{'kv_p': model.cfg.kv_routing.p, **overrides})
  other = nnx.eval_shape(lambda: registry.build_model(cfg, rngs=nnx.Rngs(0)))
  if cfg.scan_layers:
    per_layer = [nnx.state(b, nnx.Param) for b in model.blocks]
    nnx.update(other.blocks, jax.tree.map(lambda *a: jnp.stack(a), *per_layer))
    nnx.update(other.embed, nnx.state(model.embed))
    nnx.update(other.final_norm, nnx.state(model.final_norm))
  else:
    nnx.update(other, nnx.state(model))
  return other


def inputs(batch=B, length=T, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (batch, length), 0, 64)
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  return tokens, jnp.ones((batch, length), jnp.int32), positions


def loss_fn(params, graphdef, data, rng, sources=None, stop_gradient=False):
  """Mean next-token loss; `sources` (if given) overrides the model's own routing."""
  model = nnx.merge(graphdef, params)
  tokens, segment_ids, positions = data
  if sources is None:
    h = model(tokens, segment_ids=segment_ids, positions=positions, rng=rng)
  else:
    x = model.embed(tokens, jnp.float32)
    x = kv_routing.apply_routed_blocks(
        model.blocks, x, Routes(sources, stop_gradient), scanned=model.cfg.scan_layers,
        policy=None, segment_ids=segment_ids, positions=positions)
    h = model.final_norm(x)
  logp = jax.nn.log_softmax(model.logits(h)[:, :-1])
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


_value_and_grad = jax.jit(jax.value_and_grad(loss_fn), static_argnums=(1, 5))
_loss = jax.jit(loss_fn, static_argnums=(1, 5))


def value_and_grad(model, rng, sources=None, stop_gradient=False, data=None):
  graphdef, params = nnx.split(model, nnx.Param)
  return _value_and_grad(params, graphdef, data if data is not None else inputs(), rng, sources,
                         stop_gradient)


def loss_of(model, rng):
  return _loss(*nnx.split(model, nnx.Param)[::-1], inputs(), rng)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-7):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@nnx.jit(static_argnames='kv_plan')
def _hidden(model, data, rng, kv_plan):
  tokens, segment_ids, positions = data
  return model(tokens, segment_ids=segment_ids, positions=positions, rng=rng, kv_plan=kv_plan)


def hidden(model, rng=None, kv_plan=None):
  return _hidden(model, inputs(), rng, kv_plan)


@nnx.jit
def own_kvs(model, data):
  """Every layer's own K/V from a plain full-sequence forward."""
  tokens, segment_ids, positions = data
  x, kvs = model.embed(tokens, jnp.float32), []
  for block in model.blocks:
    x, kv = block(x, segment_ids=segment_ids, positions=positions)
    kvs.append(kv)
  return kvs


_prefill = nnx.jit(decode.prefill, static_argnames=('plan', 'max_len'))
_decode_step = nnx.jit(decode.decode_step, static_argnames='plan')


def decode_logits(model, tokens, plan, prompt_len):
  """Prefill `prompt_len` tokens, then feed the rest one by one: logits at every position."""
  logits, cache = _prefill(model, tokens[:, :prompt_len], plan=plan, max_len=tokens.shape[1])
  out = [logits]
  for t in range(prompt_len, tokens.shape[1]):
    step_logits, cache = _decode_step(model, cache, tokens[:, t], plan=plan)
    out.append(step_logits[:, None])
  return jnp.concatenate(out, axis=1), cache


@pytest.fixture(scope='module')
def dense():
  return build()


@pytest.fixture(scope='module')
def routed(dense):
  return like(dense, kv_p=0.5)


# --- training: the draw --------------------------------------------------------------------

def test_draws_match_p_and_uniform_sources_chi_square():
  p, n, layers = 0.6, 4000, 6
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(n))
  draws = np.asarray(jax.jit(jax.vmap(lambda k: kv_routing.draw_sources(k, layers, p)))(keys))
  for i in (0, 1, n - 1):  # deterministic for the key, jitted and batched or not
    np.testing.assert_array_equal(draws[i], kv_routing.draw_sources(keys[i], layers, p))
  assert (draws[:, 0] == 0).all(), 'layer 0 always keeps its own K/V'
  for l in range(1, layers):
    assert (draws[:, l] <= l).all()
    kept = (draws[:, l] == l).sum()
    counts = [kept] + [(draws[:, l] == j).sum() for j in range(l)]
    expected = [n * p] + [n * (1 - p) / l] * l
    _, p_value = stats.chisquare(counts, expected)
    assert p_value > 1e-3, (l, counts, expected, p_value)
    assert abs(kept / n - p) < 0.03
  # Sources differ between steps (it is a real draw, not a fixed pattern).
  assert len({tuple(d) for d in draws[:50]}) > 10


def test_same_draw_on_every_replica_of_a_data8_mesh():
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Explicit,))
  rng = jax.random.fold_in(jax.random.key(3), 11)  # the step key, replicated
  tokens = jax.device_put(jnp.arange(8 * 16).reshape(8, 16), NamedSharding(mesh, P('data')))

  def per_replica(rng, tokens_local):
    sources = kv_routing.draw_sources(rng, L, 0.3)
    # Each replica reports its sources and the first token of its own batch shard.
    return jnp.concatenate([sources, tokens_local[:, 0]])[None]

  seen = jax.jit(jax.shard_map(per_replica, mesh=mesh, in_specs=(P(), P('data')),
                               out_specs=P('data'), check_vma=False))(rng, tokens)
  seen = np.asarray(seen)
  np.testing.assert_array_equal(seen[:, L], np.arange(8) * 16)  # eight different shards
  np.testing.assert_array_equal(seen[:, :L], np.broadcast_to(seen[0, :L], (8, L)))
  np.testing.assert_array_equal(seen[0, :L], kv_routing.draw_sources(rng, L, 0.3))


def test_routed_step_sharded_over_data8_equals_single_device(routed):
  rng = jax.random.key(5)
  loss1, grads1 = value_and_grad(routed, rng)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
  sharded = tuple(jax.device_put(x, NamedSharding(mesh, P('data'))) for x in inputs())
  # Rematerialised per layer, too (nnx.remat in the unrolled routed driver).
  loss8, grads8 = value_and_grad(like(routed, remat='dots'), rng, data=sharded)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
  assert_trees_close(grads8, grads1)


# --- training: the routed forward ----------------------------------------------------------

def test_p1_equals_base_model_exactly(dense):
  rng = jax.random.key(0)
  np.testing.assert_array_equal(hidden(dense, rng=rng), hidden(dense))
  identity = kv_routing.draw_sources(rng, L, 1.0)
  np.testing.assert_array_equal(identity, np.arange(L))
  # The routed machinery itself, fed the identity routes, is the base model too.
  loss_base, g_base = value_and_grad(dense, rng)
  loss_id, g_id = value_and_grad(dense, rng, identity)
  np.testing.assert_allclose(loss_id, loss_base, rtol=1e-6)
  assert_trees_close(g_id, g_base)


def test_borrowed_kv_is_the_source_layers_own_and_passes_gradient(dense):
  rng = jax.random.key(0)
  sources = jnp.array([0, 0, 0, 3])   # layers 1 and 2 attend with layer 0's K/V
  loss, g = value_and_grad(dense, rng, sources)
  # Nobody uses the own K/V of layers 1 and 2, but their queries are used.
  for l in (1, 2):
    assert not np.any(g['blocks'][l]['attn']['wk']) and not np.any(g['blocks'][l]['attn']['wv'])
    assert np.any(g['blocks'][l]['attn']['wq'])
  loss_stop, g_stop = value_and_grad(dense, rng, sources, stop_gradient=True)
  np.testing.assert_array_equal(loss_stop, loss)
  # Gradient reaches layer 0's K/V through layers 1 and 2 unless stopped.
  wk0 = lambda g: np.asarray(g['blocks'][0]['attn']['wk'])
  assert not np.allclose(wk0(g), wk0(g_stop), atol=1e-9)
  # The same loss as the eval forward under the cache plan S = {0, 3}.
  np.testing.assert_allclose(loss_of(like(dense, kv_cache_layers='0,3'), None), loss, rtol=1e-6)
  assert not np.allclose(loss, value_and_grad(dense, rng)[0], rtol=1e-5)


def test_scan_and_unrolled_route_identically(routed):
  scanned = like(routed, scan_layers=True, remat='full')
  for step in range(2):
    rng = jax.random.fold_in(jax.random.key(9), step)
    loss_u, g_u = value_and_grad(routed, rng)
    loss_s, g_s = value_and_grad(scanned, rng)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[g_u['blocks'][l] for l in range(L)])
    assert_trees_close(g_s['blocks'], stacked)
    assert_trees_close(g_s['embed'], g_u['embed'])
  # The draws route for real: the loss is not the unrouted one.
  assert not np.allclose(loss_u, loss_of(routed, None), rtol=1e-6)


# --- inference: plans, eval forward and decoding -------------------------------------------

def test_cache_plans():
  assert CachePlan.every(6, 1).sources == (0, 1, 2, 3, 4, 5)
  assert CachePlan.every(6, 2).sources == (0, 0, 2, 2, 4, 4)
  assert CachePlan.every(7, 3).cached == (0, 3, 6)
  assert CachePlan.of_layers(5, [0, 3]).sources == (0, 0, 0, 3, 3)
  assert CachePlan.every(8, 4).retention == 0.25
  assert CachePlan.from_config(model_config(kv_cache_layers='0,1,3')).sources == (0, 1, 1, 3)
  assert CachePlan.from_config(model_config(kv_cache_every=2)).sources == (0, 0, 2, 2)
  with pytest.raises(ValueError, match='cache_layers'):
    CachePlan.of_layers(4, [1, 2])
  with pytest.raises(ValueError, match='cache_layers'):
    CachePlan.from_config(model_config(kv_cache_layers='0;2'))
  with pytest.raises(ValueError, match='cache_every'):
    CachePlan.every(4, 0)
  with pytest.raises(ValueError, match='kv_routing.p'):
    kv_routing.layer_routes(model_config(kv_p=1.5), jax.random.key(0))


def test_full_plan_decode_equals_full_cache_forward(dense):
  tokens, _, _ = data = inputs()
  plan = CachePlan.every(L, 1)
  logits, cache = decode_logits(dense, tokens, plan, prompt_len=8)
  np.testing.assert_allclose(logits, dense.logits(hidden(dense)), rtol=1e-5, atol=1e-5)
  # The cache holds every layer's own K/V, as the full-sequence forward computes them.
  assert len(cache.k) == L and int(cache.length) == T
  for l, (k, v) in enumerate(own_kvs(dense, data)):
    np.testing.assert_allclose(cache.k[l], k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cache.v[l], v, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='full'):
    decode.decode_step(dense, cache, tokens[:, 0], plan)


@pytest.mark.parametrize('scan', [False, True])
def test_plan_decode_equals_full_recompute_under_plan(routed, scan):
  model = like(routed, scan_layers=True) if scan else routed
  tokens = inputs()[0]
  full_cache = decode.cache_bytes(model, CachePlan.every(L, 1), B, T)
  assert full_cache == 2 * L * B * T * 2 * 8 * 4   # K and V, L layers, B x T x K x Dh float32
  plans = ([CachePlan.every(L, 4)] if scan else
           [CachePlan.every(L, 2), CachePlan.of_layers(L, [0, 1, 3])])
  previous = model.logits(hidden(model))
  for plan in plans:
    recompute = model.logits(hidden(model, kv_plan=plan))
    logits, cache = decode_logits(model, tokens, plan, prompt_len=5)
    np.testing.assert_allclose(logits, recompute, rtol=1e-5, atol=1e-5)
    assert len(cache.k) == len(plan.cached)
    assert decode.cache_bytes(model, plan, B, T) == full_cache * plan.retention
    # Each plan changes the function (sharing is really applied).
    assert not np.allclose(recompute, previous, atol=1e-4)
    previous = recompute


def test_eval_default_follows_config_plan(dense):
  np.testing.assert_array_equal(hidden(like(dense, kv_cache_every=2)),
                                hidden(dense, kv_plan=CachePlan.every(L, 2)))
