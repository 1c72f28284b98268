"""MLA (modeling/mla.py) and CART with MLA prelude/coda: a plain-numpy reference on a tiny case,
absorbed = unabsorbed, RoPE moves only the decoupled part, decoding with the latent cache
equals the full forward, and the paper's parameter counts at d=1024, R=6 (eval_shape only)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import base, cart_d1024, cart_dense_effective, cart_dense_stored
from modeling import cart, cart_decode, mla, registry
from modeling.transformer import Block, Runtime

B, L, V = 2, 12, 64


def model_config(**cart_keys):
  m = base.get_config().model
  m.name = 'cart'
  m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim, m.vocab_size = 32, 2, 2, 16, 64, V
  m.init_std = 0.2
  m.cart.update(prelude_layers=2, coda_layers=1, loops=2, max_loops=8)
  m.cart.update(**cart_keys)
  return ml_collections.FrozenConfigDict(m)


def _inputs(seed=0):
  x = jax.random.normal(jax.random.PRNGKey(seed), (B, L, 32))
  seg = jnp.ones((B, L), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  return x, seg, pos


def _numpy_rope(x, pos, theta):
  d = x.shape[-1]
  inv = theta ** (-np.arange(0, d, 2) / d)
  ang = pos[..., None] * inv                      # [B, L, d/2]
  sin, cos = np.sin(ang)[:, :, None], np.cos(ang)[:, :, None]
  if x.ndim == 3:
    sin, cos = sin[:, :, 0], cos[:, :, 0]
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def numpy_mla(attn: mla.MLAttention, x, pos, eps):
  """The DeepSeek-V2 equations written out in numpy, one head at a time."""
  p = {k: np.asarray(getattr(attn, k)[...], np.float64)
       for k in ('w_dkv', 'w_uk', 'w_uv', 'w_kr', 'wq', 'wo')}
  x, pos = np.asarray(x, np.float64), np.asarray(pos, np.float64)
  R, theta = attn.rope_dim, attn.rope_theta
  c = x @ p['w_dkv']
  c = c / np.sqrt(np.mean(c * c, -1, keepdims=True) + eps) * np.asarray(attn.kv_norm.scale[...])
  k_r = _numpy_rope(x @ p['w_kr'], pos, theta)                      # [B, L, R]
  q = np.einsum('bld,dhk->blhk', x, p['wq'])
  q_c, q_r = q[..., :-R], _numpy_rope(q[..., -R:], pos, theta)
  H, Dh = p['wq'].shape[1:]
  out = np.zeros((B, L, H, Dh))
  for h in range(H):
    k_c = c @ p['w_uk'][:, h]                                       # [B, L, Dh - R]
    v = c @ p['w_uv'][:, h]
    s = (np.einsum('bln,bsn->bls', q_c[:, :, h], k_c)
         + np.einsum('blr,bsr->bls', q_r[:, :, h], k_r)) / np.sqrt(Dh)
    s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    out[:, :, h] = (w / w.sum(-1, keepdims=True)) @ v
  return np.einsum('blhk,hkd->bld', out, p['wo'])


@pytest.fixture(scope='module')
def attn():
  return mla.MLAttention(model_config(), rngs=nnx.Rngs(1), runtime=Runtime())


def test_forward_equals_numpy_reference(attn):
  x, seg, pos = _inputs()
  out, _ = attn(x, segment_ids=seg, positions=pos)
  np.testing.assert_allclose(np.asarray(out), numpy_mla(attn, x, pos, 1e-6), rtol=1e-4,
                             atol=1e-5)


def test_absorbed_equals_unabsorbed(attn):
  x, seg, pos = _inputs(1)
  out, _ = attn(x, segment_ids=seg, positions=pos)
  c, kr = attn.latent(x, pos)
  kw = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos)
  absorbed = attn.attend_latent(attn.query(x, pos), c, kr, kw)
  np.testing.assert_allclose(np.asarray(absorbed), np.asarray(out), rtol=1e-4, atol=1e-5)


def test_rope_moves_only_the_decoupled_part(attn):
  x, seg, pos = _inputs(2)
  q, (k, _) = attn.query(x, pos), attn.key_value(x, pos)
  q7, (k7, _) = attn.query(x, pos + 7), attn.key_value(x, pos + 7)
  R = attn.rope_dim
  np.testing.assert_array_equal(np.asarray(q[..., :-R]), np.asarray(q7[..., :-R]))
  np.testing.assert_array_equal(np.asarray(k[..., :-R]), np.asarray(k7[..., :-R]))
  assert not np.allclose(np.asarray(q[..., -R:]), np.asarray(q7[..., -R:]))
  # Shifting every position by a constant leaves the scores (and the output) unchanged.
  out, _ = attn(x, segment_ids=seg, positions=pos)
  out7, _ = attn(x, segment_ids=seg, positions=pos + 7)
  np.testing.assert_allclose(np.asarray(out7), np.asarray(out), rtol=1e-4, atol=1e-5)


def test_parameter_count_matches_formula(attn):
  cfg = model_config()
  n = sum(x.size for x in jax.tree.leaves(nnx.state(attn, nnx.Param)))
  assert n == mla.parameter_count(cfg)


def test_mla_block_keeps_every_block_attribute():
  """MLABlock sets Block's attributes itself: one missing after a change to Block fails here."""
  cfg = model_config()
  block, mla_block = Block(cfg, rngs=nnx.Rngs(0), runtime=Runtime()), \
      mla.MLABlock(cfg, rngs=nnx.Rngs(0), runtime=Runtime())
  assert set(vars(block)) <= set(vars(mla_block)), set(vars(block)) - set(vars(mla_block))


def test_bad_keys_name_the_key():
  with pytest.raises(ValueError, match='prelude_attention'):
    registry.build_model(model_config(prelude_attention='mha'), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='mla_rope_dim'):
    registry.build_model(model_config(mla_rope_dim=16), rngs=nnx.Rngs(0))


# --- CART with MLA: which layers, decoding, counts ---------------------------------------

@pytest.mark.parametrize('prelude,coda', [('mla', 'mla'), ('gqa', 'mla'), ('mla', 'gqa')])
def test_cart_layer_kinds_and_cached_decode_equal_forward(prelude, coda):
  cfg = model_config(prelude_attention=prelude, coda_attention=coda)
  model = registry.build_model(cfg, rngs=nnx.Rngs(4))
  kinds = [isinstance(b, mla.MLABlock) for b in (*model.prelude, *model.coda)]
  assert kinds == [prelude == 'mla'] * 2 + [coda == 'mla']
  tokens = jax.random.randint(jax.random.PRNGKey(5), (B, L), 0, V)
  seg = jnp.ones((B, L), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  full = np.asarray(model.logits(model(tokens, segment_ids=seg, positions=pos, loops=3)))
  P = 5
  logits, cache = cart_decode.prefill(model, tokens[:, :P], L, loops=3)
  steps = [logits]
  for t in range(P, L):
    step, cache = cart_decode.decode_step(model, cache, tokens[:, t], loops=3)
    steps.append(step[:, None])
  got = np.concatenate([np.asarray(s) for s in steps], axis=1)
  np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-4)
  if prelude == 'mla':   # the latent cache: C + R numbers per token and layer
    c, kr = cache.prelude[0]
    assert c.shape == (B, L, mla.latent_dim(cfg)) and kr.shape == (B, L, mla.rope_dim(cfg))


def test_cart_flops_count_mla_layers():
  m = model_config()
  D = m.d_model
  gqa = model_config(prelude_attention='gqa', coda_attention='gqa')
  layer_gqa = D * m.head_dim * (m.num_heads + 2 * m.num_kv_heads) + m.num_heads * m.head_dim * D
  layer_mla = mla.parameter_count(m) - mla.latent_dim(m)
  diff = cart.forward_flops_per_token(gqa, 64) - cart.forward_flops_per_token(m, 64)
  assert diff == pytest.approx(2 * 3 * (layer_gqa - layer_mla))


def _count(cfg) -> int:
  frozen = ml_collections.FrozenConfigDict(cfg.model)
  model = nnx.eval_shape(lambda: registry.build_model(frozen, rngs=nnx.Rngs(0)))
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def test_d1024_r6_counts_the_papers_125m_stored_179m_effective():
  """Paper table: 125M stored / 179M effective at d=1024, R=6 (counted without allocating)."""
  c = cart_d1024.get_config('6')
  assert c.model.cart.prelude_attention == c.model.cart.coda_attention == 'mla'
  stored, effective = cart.parameter_counts(c.model)
  assert abs(stored / 125e6 - 1) < 0.01, stored
  assert abs(effective / 179e6 - 1) < 0.01, effective
  assert stored == _count(c)
  # With GQA prelude/coda (loomax before MLA) the counts were 7% / 5% over the paper's.
  c.model.cart.prelude_attention = c.model.cart.coda_attention = 'gqa'
  gqa_stored, gqa_effective = cart.parameter_counts(c.model)
  assert gqa_stored / 125e6 - 1 > 0.05 and gqa_effective / 179e6 - 1 > 0.04


def test_dense_baselines_match_cart_counts():
  stored, effective = cart.parameter_counts(cart_d1024.get_config('6').model)
  dense_stored = cart_dense_stored.get_config('1024,6')
  dense_effective = cart_dense_effective.get_config('1024,6')
  assert dense_stored.model.name == dense_effective.model.name == 'transformer'
  assert (dense_stored.model.num_layers, dense_effective.model.num_layers) == (7, 11)
  n_s, n_e = _count(dense_stored), _count(dense_effective)
  assert abs(n_s / stored - 1) < 0.02, (n_s, stored)
  assert abs(n_e / effective - 1) < 0.03, (n_e, effective)
  # The nearest depth: one layer more or fewer is farther from the target.
  per_layer = (_count(cart_dense_stored.cart_dense.dense_config(1024, 8)) - n_s)
  assert abs(n_s - stored) <= abs(n_s + per_layer - stored)
  assert abs(n_e - effective) <= min(abs(n_e + per_layer - effective),
                                     abs(n_e - per_layer - effective))
  # Same width, data and optimizer as the CART run they are compared with.
  cart_cfg = cart_d1024.get_config('6')
  for key in ('seq_len', 'batch_size', 'steps'):
    assert dense_stored[key] == cart_cfg[key]
  assert dense_stored.model.d_model == 1024 and dense_stored.optimizer.lr == cart_cfg.optimizer.lr


def test_cart_with_mla_trains_the_same_under_ring_attention():
  """MLA goes through the attend seam: CART (MLA prelude/coda) on data=2 x context=4 with zigzag
  ring attention takes the same steps as on one device."""
  import jax.numpy as jnp

  from parallelism import mesh as mesh_lib
  from tests import helpers
  from training.program import build_program

  def config(impl, **mesh):
    c = base.get_config()
    c.steps, c.seq_len, c.batch_size = 2, 32, 4
    c.model.update(name='cart', d_model=32, num_heads=2, num_kv_heads=2, head_dim=16,
                   mlp_dim=64, vocab_size=64)
    c.model.cart.update(prelude_layers=1, coda_layers=1, loops=2)
    c.optimizer.warmup_steps = 1
    c.mesh.update(**{**dict(data=1, fsdp=1, context=1, tensor=1), **mesh})
    c.parallelism.context_impl = impl
    c.attention.loss_chunk = 0
    return c

  def train(c, devices, state=None):
    program = build_program(c, mesh_lib.make_mesh(c.mesh, devices))
    state = program.init_state() if state is None else jax.tree.map(jnp.copy, state)
    losses = []
    for i in range(2):
      state, metrics = program.train_step(state, program.global_batch(
          helpers.random_batch(c, seed=i)))
      losses.append(float(metrics['loss']))
    return np.array(losses), jax.device_get(state.params)

  ring = config('ring', data=2, context=4)
  init = build_program(ring, mesh_lib.make_mesh(ring.mesh)).init_state()
  ref_losses, ref_params = train(config('none'), jax.devices()[:1], jax.device_get(init))
  losses, params = train(ring, jax.devices(), init)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
