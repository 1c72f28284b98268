"""Sampling with caches: greedy decoding equals the arg-max of the full forward at every step,
for every family (dense under a shared-cache plan, CART at an inference R, SambaY)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base, sambay_tiny
from modeling import registry, sampling
from modeling.kv_routing import CachePlan

PROMPT, NEW = 7, 9


def _model_config(family):
  if family == 'sambay':
    m = sambay_tiny.get_config().model
    m.update(num_layers=4, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
    m.sambay.window = 4      # shorter than the sequence: the ring buffer wraps
    return m
  m = base.get_config().model
  m.update(num_layers=4, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
  m.init_std = 0.2           # sharp logits: arg-max is far from ties
  if family == 'cart':
    m.name = 'cart'
    m.cart.update(prelude_layers=1, coda_layers=1, loops=3, max_loops=8)
  return m


def _full_forward_argmax(model, tokens_BL, **kw):
  B, L = tokens_BL.shape
  h = model(tokens_BL, segment_ids=jnp.ones((B, L), jnp.int32),
            positions=jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)), **kw)
  return np.asarray(jnp.argmax(model.logits(h), axis=-1))


@pytest.mark.parametrize('family,kw', [
    ('transformer', {}),
    ('transformer', {'plan': CachePlan.every(4, 2)}),
    ('cart', {'loops': 5}),
    ('sambay', {}),
])
def test_greedy_decode_equals_full_forward_argmax(family, kw):
  model = registry.build_model(_model_config(family), rngs=nnx.Rngs(3))
  prompt = np.random.default_rng(0).integers(0, 256, (2, PROMPT), dtype=np.int32)
  out = sampling.generate(model, prompt, NEW, sampling.Sampler(temperature=0.0), **kw)
  assert out.tokens.shape == (2, NEW)
  seq = np.concatenate([prompt, out.tokens], axis=1)
  forward_kw = {'kv_plan': kw['plan']} if 'plan' in kw else (
      {'loops': kw['loops']} if 'loops' in kw else {})
  argmax = _full_forward_argmax(model, jnp.asarray(seq[:, :-1]), **forward_kw)
  # Token t of the generation is the arg-max after prompt + generated[:t].
  np.testing.assert_array_equal(out.tokens, argmax[:, PROMPT - 1:])
  assert len(set(out.tokens.ravel().tolist())) > 1      # not a degenerate constant stream
  assert out.cache_bytes > 0 and out.decode_tokens_per_s > 0


def test_sampling_filters_and_seed():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4096))
  rng = jax.random.PRNGKey(0)
  draw = lambda s: np.asarray(s(logits, rng))
  assert set(draw(sampling.Sampler(top_k=2)).tolist()) == {0, 1}
  assert set(draw(sampling.Sampler(top_p=0.7)).tolist()) == {0, 1}   # 0.5 < 0.7 <= 0.8
  assert set(draw(sampling.Sampler(top_p=0.1)).tolist()) == {0}
  freq = np.bincount(draw(sampling.Sampler()), minlength=4) / 4096
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
  np.testing.assert_array_equal(draw(sampling.Sampler()), draw(sampling.Sampler()))
  with pytest.raises(ValueError, match='top_p'):
    sampling.Sampler(top_p=0.0)


def test_loops_rejected_outside_cart_and_beyond_the_table():
  dense = registry.build_model(_model_config('transformer'), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='--loops'):
    sampling.decoder_for(dense, loops=2)
  cart = registry.build_model(_model_config('cart'), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='max_loops'):
    sampling.decoder_for(cart, loops=9)
