"""Dense model: shapes, causality and packing through gradients, scan == loop, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modeling import registry
from modeling.attention import KERNELS, self_attention_kwargs
from tests.helpers import forward_with_input_delta, random_batch, tiny_config


def build(config, seed=0):
  return registry.build_model(config.model, rngs=nnx.Rngs(seed))


@pytest.fixture(scope='module')
def config():
  return tiny_config()


@pytest.fixture(scope='module')
def model(config):
  return build(config)


def test_output_shapes(config, model):
  b = random_batch(config)
  h = model(b['inputs'], segment_ids=b['segment_ids'], positions=b['positions'])
  assert h.shape == (config.batch_size, config.seq_len, config.model.d_model)
  assert model.logits(h).shape == (config.batch_size, config.seq_len, config.model.vocab_size)
  assert np.isfinite(np.asarray(h)).all()


def input_jacobian_norms(model, tokens, seg, pos, t):
  """|d h[0, t] / d x[0, s]| for every s: which input positions position t depends on."""
  L, D = tokens.shape[1], model.cfg.d_model

  def out_at_t(delta):
    return forward_with_input_delta(model, tokens, delta, seg, pos)[0, t].sum()

  g = jax.grad(out_at_t)(jnp.zeros((1, L, D)))
  return np.abs(np.asarray(g[0])).sum(-1)


def test_causal_through_gradients(config, model):
  L = config.seq_len
  tokens = jnp.arange(L, dtype=jnp.int32)[None] % config.model.vocab_size
  seg, pos = jnp.ones((1, L), jnp.int32), jnp.arange(L, dtype=jnp.int32)[None]
  for t in (0, L // 2, L - 1):
    dep = input_jacobian_norms(model, tokens, seg, pos, t)
    assert dep[t + 1:].max(initial=0.0) == 0.0, f'position {t} depends on a later position'
    assert dep[:t + 1].min() > 0.0


def test_packed_documents_invisible(config, model):
  L = config.seq_len
  cut = L // 3
  tokens = (jnp.arange(L, dtype=jnp.int32)[None] * 7) % config.model.vocab_size
  seg = jnp.asarray(np.where(np.arange(L) < cut, 1, 2)[None], jnp.int32)
  pos = jnp.asarray(np.where(np.arange(L) < cut, np.arange(L), np.arange(L) - cut)[None],
                    jnp.int32)
  dep = input_jacobian_norms(model, tokens, seg, pos, L - 1)
  assert dep[:cut].max() == 0.0 and dep[cut:].min() > 0.0
  # The second document alone, from position 0, gives the same hidden states.
  packed = model(tokens, segment_ids=seg, positions=pos)[0, cut:]
  alone = model(tokens[:, cut:], segment_ids=seg[:, cut:], positions=pos[:, cut:])[0]
  np.testing.assert_allclose(packed, alone, atol=1e-5, rtol=1e-5)


def test_scan_matches_loop(config, model):
  scanned = build(tiny_config(**{'model.scan_layers': True}))
  _, loop_params = nnx.split(model, nnx.Param)
  loop_params = nnx.to_pure_dict(loop_params)
  gd, scan_params = nnx.split(scanned, nnx.Param)
  scan_params = nnx.to_pure_dict(scan_params)
  blocks = [loop_params['blocks'][i] for i in range(config.model.num_layers)]
  scan_params = {**loop_params, 'blocks': jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
  b = random_batch(config)
  kw = dict(segment_ids=b['segment_ids'], positions=b['positions'])
  np.testing.assert_allclose(nnx.merge(gd, scan_params)(b['inputs'], **kw),
                             model(b['inputs'], **kw), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('scan', [False, True])
def test_remat_keeps_gradients(scan):
  cfg = tiny_config(**{'model.scan_layers': scan})
  b = random_batch(cfg)

  def grads(remat):
    cfg.model.remat = remat
    gd, p = nnx.split(build(cfg), nnx.Param)

    def loss(p):
      m = nnx.merge(gd, p)
      return m.logits(m(b['inputs'], segment_ids=b['segment_ids'],
                        positions=b['positions'])).mean()
    return jax.jit(jax.grad(loss))(nnx.to_pure_dict(p))

  ref = grads('none')
  for remat in ('full', 'dots', 'save_attention_out'):
    for want, got in zip(jax.tree.leaves(ref), jax.tree.leaves(grads(remat))):
      np.testing.assert_allclose(got, want, atol=1e-6, err_msg=remat)


def test_kernels_agree_with_gqa_and_window():
  rng = np.random.default_rng(0)
  B, L, H, K, D = 2, 16, 4, 2, 8
  q = jnp.asarray(rng.normal(size=(B, L, H, D)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(B, L, K, D)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(B, L, K, D)), jnp.float32)
  seg = jnp.asarray(np.repeat([[1] * 10 + [2] * 6], B, 0), jnp.int32)
  pos = jnp.asarray(np.repeat([list(range(10)) + list(range(6))], B, 0), jnp.int32)
  kw = self_attention_kwargs(seg, pos)
  for window in (0, 3):
    ref = naive_attention(q, k, v, seg, pos, window)
    for name, fn in KERNELS.items():
      np.testing.assert_allclose(fn(q, k, v, causal=True, window=window, **kw), ref,
                                 atol=1e-5, err_msg=name)


def naive_attention(q, k, v, seg, pos, window):
  """Per-head loops with an explicit mask: the definition the kernels must meet."""
  B, L, H, D = q.shape
  K = k.shape[2]
  out = np.zeros((B, L, H, D))
  for b in range(B):
    for h in range(H):
      s = np.asarray(q[b, :, h]) @ np.asarray(k[b, :, h // (H // K)]).T / np.sqrt(D)
      allowed = ((seg[b][:, None] == seg[b][None]) & (pos[b][:, None] >= pos[b][None]))
      if window:
        allowed &= (pos[b][:, None] - pos[b][None]) < window
      s = np.where(np.asarray(allowed), s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ np.asarray(v[b, :, h // (H // K)])
  return out


def test_gqa_head_count_error():
  with pytest.raises(ValueError, match='num_kv_heads=3 must divide model.num_heads=4'):
    build(tiny_config(**{'model.num_kv_heads': 3}))


def test_unknown_model_name_error():
  with pytest.raises(ValueError, match="model.name='nope' is not registered"):
    build(tiny_config(**{'model.name': 'nope'}))


def test_rope_off_means_positions_unused(config):
  cfg = tiny_config(**{'model.rope_theta': 0.0})
  m = build(cfg)
  b = random_batch(cfg)
  # Without rotary embeddings, shifting every position within its document changes nothing.
  h1 = m(b['inputs'], segment_ids=b['segment_ids'], positions=b['positions'])
  h2 = m(b['inputs'], segment_ids=b['segment_ids'], positions=b['positions'] + 5)
  np.testing.assert_allclose(h1, h2, atol=1e-6)


def test_only_the_registry_and_family_modules_know_a_family():
  """Callers ask `registry.get_family(name)`; none compares a family's name or type, nor reads
  a family's config section (docs/architecture.md, "Adding a model family")."""
  import pathlib
  import re
  root = pathlib.Path(__file__).resolve().parents[1]
  family_modules = {'registry', 'transformer', 'cart', 'cart_core', 'cart_decode', 'mla', 'sambay',
                    'sambay_decode', 'kv_routing', 'ssm', 'decode'}
  names = re.compile(r"name\s*[!=]=\s*'(transformer|cart|sambay)'")
  code_refs = re.compile(r"isinstance\([^)]*\b(Transformer|Cart|SambaY)\b|\bmodel\.(sambay|cart)\b")
  strings = re.compile(r"[rf]?'[^']*'|[rf]?\"[^\"]*\"")
  found = []
  for folder in ('modeling', 'parallelism', 'training'):
    for path in (root / folder).rglob('*.py'):
      if folder == 'modeling' and path.stem in family_modules:
        continue
      for i, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split('#')[0]
        if names.search(code) or code_refs.search(strings.sub("''", code)):
          found.append(f'{path.relative_to(root)}:{i}: {line.strip()}')
  assert not found, '\n'.join(found)
