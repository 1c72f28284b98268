"""Mamba-1 selective scan: parallel scans against the sequential reference, segment resets,
the recurrent decoding step, and packed documents staying invisible to each other."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from modeling import ssm

B, L, E, N = 2, 37, 8, 4   # L is not a multiple of the chunk, so padding is exercised
CHUNK = 8


@pytest.fixture(scope='module')
def scan_inputs():
  r = np.random.default_rng(0)
  f32 = lambda *shape: r.standard_normal(shape).astype(np.float32)
  dt = np.log1p(np.exp(f32(B, L, E)))   # softplus, as the layer makes it
  A = -np.exp(0.5 * f32(E, N))
  reset = np.zeros((B, L), bool)
  reset[0, 11] = reset[1, 20] = True
  return f32(B, L, E), dt, A, f32(B, L, N), f32(B, L, N), reset, f32(B, E, N)


@pytest.mark.parametrize('impl', ['associative', 'chunked'])
def test_parallel_scan_equals_sequential_forward_and_grad(scan_inputs, impl):
  x, dt, A, Bm, C, reset, h0 = scan_inputs
  fast = ssm.make_scan(impl, CHUNK)
  w = np.random.default_rng(9).standard_normal((B, L, E)).astype(np.float32)

  def loss(scan, *args):
    y, h = scan(*args[:5], reset_BL=reset, h0_BEN=args[5])
    return jnp.sum(y * w) + jnp.sum(h ** 2), (y, h)

  (_, (y_ref, h_ref)), g_ref = jax.jit(jax.value_and_grad(
      lambda *a: loss(ssm.sequential_scan, *a), argnums=tuple(range(6)), has_aux=True))(
          x, dt, A, Bm, C, h0)
  (_, (y, h)), g = jax.jit(jax.value_and_grad(
      lambda *a: loss(fast, *a), argnums=tuple(range(6)), has_aux=True))(x, dt, A, Bm, C, h0)
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(h, h_ref, atol=1e-5, rtol=1e-5)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_reset_forgets_everything_before_it(scan_inputs):
  x, dt, A, Bm, C, _, h0 = scan_inputs
  s = 13
  reset = jnp.zeros((B, L), bool).at[:, s].set(True)
  y, h = jax.jit(ssm.associative_scan)(x, dt, A, Bm, C, reset_BL=reset, h0_BEN=h0)
  y_tail, h_tail = jax.jit(ssm.sequential_scan)(x[:, s:], dt[:, s:], A, Bm[:, s:], C[:, s:],
                                                reset_BL=jnp.zeros((B, L - s), bool))
  np.testing.assert_allclose(y[:, s:], y_tail, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(h, h_tail, atol=1e-5, rtol=1e-5)


def test_causal_conv_taps_stay_inside_segment():
  x = jnp.arange(1.0, 9.0).reshape(1, 8, 1)
  w = jnp.ones((4, 1))
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2]])
  out = jax.jit(ssm.causal_conv)(x, w, jnp.zeros((1,)), seg)[0, :, 0]
  # Sums of up to four previous values, never crossing the 1 -> 2 boundary at index 3.
  np.testing.assert_allclose(out, [1, 3, 6, 4, 9, 15, 22, 26])


def test_unknown_scan_impl_names_the_key():
  with pytest.raises(ValueError, match='model.sambay.scan_impl'):
    ssm.make_scan('fancy')


def _cfg():
  c = ml_collections.ConfigDict()
  c.d_model, c.num_layers, c.init_std = 16, 2, 0.2
  c.sambay = ml_collections.ConfigDict({'d_state': 4, 'd_conv': 4, 'expand': 2,
                                        'dt_rank': 0})
  return ml_collections.FrozenConfigDict(c)


class JittedMamba:
  """The layer's methods under jit (eager op-by-op dispatch is slow on the shared CI cores)."""

  def __init__(self, layer):
    graphdef, state = nnx.split(layer)
    self.mix = jax.jit(lambda x, seg: nnx.merge(graphdef, state).mix(x, segment_ids=seg))
    self.step = jax.jit(lambda x, s: nnx.merge(graphdef, state).step(x, s))
    self.out = lambda x, seg: self.mix(x, seg)[0]


@pytest.fixture(scope='module')
def mamba():
  return JittedMamba(ssm.Mamba(_cfg(), rngs=nnx.Rngs(0), scan_fn=ssm.make_scan('chunked', CHUNK)))


def test_recurrent_step_continues_the_full_sequence(mamba):
  Lm = 12
  x = jax.random.normal(jax.random.PRNGKey(1), (B, Lm, 16))
  seg = jnp.ones((B, Lm), jnp.int32)
  out_full, y_full, _ = mamba.mix(x, seg)
  P = 5
  _, _, state = mamba.mix(x[:, :P], seg[:, :P])
  outs, ys = [], []
  for t in range(P, Lm):
    o, y, state = mamba.step(x[:, t:t + 1], state)
    outs.append(o)
    ys.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), out_full[:, P:], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(jnp.concatenate(ys, 1), y_full[:, P:], atol=1e-5, rtol=1e-5)


def test_packed_documents_are_invisible_to_each_other(mamba):
  a, b = 9, 14
  x = jax.random.normal(jax.random.PRNGKey(2), (1, a + b, 16))
  seg = jnp.array([[1] * a + [2] * b])
  out, y, _ = mamba.mix(x, seg)
  out_b, y_b, _ = mamba.mix(x[:, a:], jnp.ones((1, b), jnp.int32))
  np.testing.assert_allclose(out[:, a:], out_b, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y[:, a:], y_b, atol=1e-5, rtol=1e-5)
  # And through gradients: the second document's outputs do not depend on the first's inputs.
  g = jax.jit(jax.grad(lambda x: jnp.sum(mamba.out(x, seg)[:, a:] ** 2)))(x)
  assert float(jnp.abs(g[:, :a]).max()) == 0.0
  assert float(jnp.abs(g[:, a:]).max()) > 0.0
