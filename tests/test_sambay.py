"""SambaY: layer roles, GMU, the shared KV cache, prefill + decode, NoPE, causality, packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import sambay_tiny
from modeling import layers, registry
from modeling import sambay as sb
from modeling import sambay_decode as sd
from modeling.transformer import Attention

B, L = 2, 16


def _model_config(**sambay_overrides):
  c = sambay_tiny.get_config().model
  c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim = 32, 4, 2, 8, 64
  c.vocab_size, c.init_std = 64, 0.1
  c.sambay.window, c.sambay.scan_chunk = 4, 8
  for k, v in sambay_overrides.items():
    c.sambay[k] = v
  return c


@pytest.fixture(scope='module')
def model():
  build = lambda: registry.build_model(_model_config(), rngs=nnx.Rngs(0))
  graphdef, _ = nnx.split(nnx.eval_shape(build))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.split(build())[1])())   # one compiled init


@pytest.fixture(scope='module')
def fns(model):
  graphdef, state = nnx.split(model)
  m = lambda: nnx.merge(graphdef, state)
  return {
      'embedded': jax.jit(lambda x, seg, pos: m().forward_embedded(
          x, segment_ids=seg, positions=pos)),
      'logits': jax.jit(lambda t, seg, pos: m().logits(m()(t, segment_ids=seg, positions=pos))),
      'embed': jax.jit(lambda t: m().embed_tokens(t)),
      'prefill': jax.jit(lambda t: sd.prefill(m(), t, L)),
      'decode': jax.jit(lambda t, c: sd.decode_step(m(), t, c)),
  }


def _tokens(seed=0, batch=B):
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, L), 0, 64)


def _one_doc(batch=B, length=L):
  return (jnp.ones((batch, length), jnp.int32),
          jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)))


def test_layer_roles_match_the_paper_table():
  roles = sb.layer_roles(16)
  assert [i for i, r in enumerate(roles) if r == sb.MAMBA] == [0, 2, 4, 6]
  assert [i for i, r in enumerate(roles) if r == sb.SWA] == [1, 3, 5, 7]
  assert roles[8] == sb.MEMORY and roles[9] == sb.FULL
  assert [i for i, r in enumerate(roles) if r == sb.GMU_ROLE] == [10, 12, 14]
  assert [i for i, r in enumerate(roles) if r == sb.CROSS] == [11, 13, 15]
  with pytest.raises(ValueError, match='model.num_layers=6'):
    sb.layer_roles(6)


def test_scan_layers_is_refused_with_the_key():
  c = _model_config()
  c.scan_layers = True
  with pytest.raises(ValueError, match='model.scan_layers'):
    nnx.eval_shape(lambda: registry.build_model(c, rngs=nnx.Rngs(0)))


def test_gmu_equals_its_formula():
  gmu = sb.GMU(8, 16, init_std=0.3, out_std=0.3, rngs=nnx.Rngs(1))
  r = np.random.default_rng(0)
  x = r.standard_normal((2, 5, 8)).astype(np.float32)
  m = r.standard_normal((2, 5, 16)).astype(np.float32)
  w1, w2 = np.asarray(gmu.w1[...]), np.asarray(gmu.w2[...])
  a = x @ w1
  want = (m * (a / (1 + np.exp(-a)))) @ w2
  np.testing.assert_allclose(gmu(jnp.asarray(x), jnp.asarray(m)), want, atol=1e-5, rtol=1e-5)


def test_cross_attention_reads_exactly_the_full_layers_kv(model, monkeypatch):
  produced, received = {}, []
  attn_call, cross_call = Attention.__call__, sb.CrossAttention.__call__

  def record_attn(self, *a, **k):
    out, kv = attn_call(self, *a, **k)
    produced[id(self)] = kv
    return out, kv

  def record_cross(self, x, kv, **k):
    received.append(kv)
    return cross_call(self, x, kv, **k)

  monkeypatch.setattr(Attention, '__call__', record_attn)
  monkeypatch.setattr(sb.CrossAttention, '__call__', record_cross)
  seg, pos = _one_doc()
  jax.make_jaxpr(lambda t: model(t, segment_ids=seg, positions=pos))(_tokens())
  full_kv = produced[id(model.layers[model.roles.index(sb.FULL)].mixer)]
  assert len(received) == model.roles.count(sb.CROSS) > 0
  for kv in received:   # by identity: the same traced arrays, no copy, no other layer's K/V
    assert len(kv) == 2 and all(a is b for a, b in zip(kv, full_kv))


def test_prefill_then_decode_reproduces_full_sequence_logits(fns):
  tokens = _tokens(1)
  seg, pos = _one_doc()
  want = fns['logits'](tokens, seg, pos)
  P = 6   # longer than the window (4): the ring buffer wraps during decoding
  got, cache = fns['prefill'](tokens[:, :P])
  np.testing.assert_allclose(got, want[:, P - 1], atol=1e-4, rtol=1e-4)
  for t in range(P, L):
    got, cache = fns['decode'](tokens[:, t], cache)
    np.testing.assert_allclose(got, want[:, t], atol=1e-4, rtol=1e-4, err_msg=f'position {t}')
  assert float(jnp.abs(want).max()) > 1e-2   # the comparison is not between near-zeros


def test_gmu_only_loss_trains_the_memory_layer(model, monkeypatch):
  graphdef, state = nnx.split(model)
  gmu_call = sb.GMU.__call__
  outs = []

  def record(self, x, m):
    y = gmu_call(self, x, m)
    outs.append(y)
    return y

  monkeypatch.setattr(sb.GMU, '__call__', record)
  seg, pos = _one_doc()
  tokens = _tokens(2)

  def gmu_loss(state):
    outs.clear()
    nnx.merge(graphdef, state)(tokens, segment_ids=seg, positions=pos)
    return sum(jnp.sum(y ** 2) for y in outs)

  grads = jax.jit(jax.grad(gmu_loss))(state)
  mem = model.roles.index(sb.MEMORY)
  for name in ('A_log', 'w_x', 'w_dt', 'w_B', 'w_C', 'conv_w'):
    g = grads['layers'][mem]['mixer'][name][...]
    assert float(jnp.abs(g).max()) > 0, name
  # The loss really is GMU-only: the last (cross-attention) layer gets no gradient.
  last = jax.tree.leaves(grads['layers'][len(model.roles) - 1])
  assert max(float(jnp.abs(g).max()) for g in last) == 0.0


def test_nope_builds_no_rotary(model, monkeypatch):
  mixers = [layer.mixer for layer in model.layers if layer.role in (sb.SWA, sb.FULL, sb.CROSS)]
  assert mixers and all(m.rope_theta == 0.0 for m in mixers)

  def no_rotary(*a, **k):
    raise AssertionError('rotary called under model.sambay.nope')

  monkeypatch.setattr(layers, 'rotary', no_rotary)
  seg, pos = _one_doc()
  jax.make_jaxpr(lambda t: model(t, segment_ids=seg, positions=pos))(_tokens())
  # Control: with NoPE off, every attention layer (cross included) carries rotary positions.
  c = _model_config(nope=False)
  c.rope_theta = 10_000.0
  rope_model = nnx.eval_shape(lambda: registry.build_model(c, rngs=nnx.Rngs(0)))
  assert all(layer.mixer.rope_theta == 10_000.0 for layer in rope_model.layers
             if layer.role in (sb.SWA, sb.FULL, sb.CROSS))


@pytest.fixture(scope='module')
def packed():
  """Two documents in one row: 7 tokens then 9, positions restarting at 0."""
  a, b = 7, 9
  seg = jnp.array([[1] * a + [2] * b])
  pos = jnp.array([list(range(a)) + list(range(b))], jnp.int32)
  return a, b, _tokens(3, batch=1), seg, pos


def test_causality_and_packing_through_gradients(fns, packed):
  a, _, tokens, seg, pos = packed
  x = fns['embed'](tokens)
  # jac[t, s] = |d sum(h_t) / d x_s|, summed over the model dimension.
  jac = jax.jit(jax.jacrev(lambda x: fns['embedded'](x, seg, pos)[0].sum(-1)))(x)
  influence = np.asarray(jnp.abs(jac[:, 0]).sum(-1))
  t_idx, s_idx = np.indices(influence.shape)
  assert influence[s_idx > t_idx].max() == 0.0                       # no peeking ahead
  assert influence[(t_idx >= a) & (s_idx < a)].max() == 0.0          # doc 2 never sees doc 1
  assert influence[(s_idx <= t_idx) & ((s_idx < a) == (t_idx < a))].min() > 0   # but all its past


def test_packed_documents_equal_separate_runs(fns, packed):
  a, b, tokens, seg, pos = packed
  h_packed = fns['embedded'](fns['embed'](tokens), seg, pos)
  pad_seg = lambda n: jnp.array([[1] * n + [0] * (L - n)])
  pad_pos = lambda n: jnp.array([list(range(n)) + [0] * (L - n)], jnp.int32)
  # Each document alone, left-aligned and followed by padding (segment 0).
  doc1 = fns['embedded'](fns['embed'](tokens), pad_seg(a), pad_pos(a))
  doc2 = fns['embedded'](fns['embed'](jnp.roll(tokens, -a, axis=1)), pad_seg(b), pad_pos(b))
  np.testing.assert_allclose(h_packed[:, :a], doc1[:, :a], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(h_packed[:, a:], doc2[:, :b], atol=1e-5, rtol=1e-5)


def test_flops_count_the_scan_and_every_role():
  c = _model_config()
  f_short, f_long = (sb.forward_flops_per_token(c, s, causal=False) for s in (64, 128))
  # Only the full-attention and cross-attention layers grow with the sequence (4 H Dh S each);
  # the window layers stay at min(window, S).
  per_token_growth = 2 * 4 * c.num_heads * c.head_dim * (128 - 64)
  assert f_long - f_short == pytest.approx(per_token_growth)
  E, N = 2 * c.d_model, c.sambay.d_state
  mamba_layers = sum(r in (sb.MAMBA, sb.MEMORY) for r in sb.layer_roles(c.num_layers))
  assert f_short > mamba_layers * 9 * E * N


def test_cache_bytes_grow_with_one_layer_only(model):
  K, Dh = model.cfg.num_kv_heads, model.cfg.head_dim
  sizes = [sd.cache_bytes(jax.eval_shape(lambda n=n: sd.init_cache(model, 1, n))) for n in (32, 64)]
  assert sizes[1] - sizes[0] == 2 * K * Dh * 4 * 32   # one layer's K and V, float32
