"""The chunked LM head + cross-entropy equals the plain one, value and gradients."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from training import loss as loss_lib

B, L, D, V = 2, 32, 16, 48


class Head:
  """The two methods `lm_loss_sum` uses from a model."""

  def __init__(self, w):
    self.w = w

  def head_matrix(self):
    return self.w

  def logits(self, h):
    return h @ self.w


def _inputs():
  r = np.random.RandomState(0)
  h = r.randn(B, L, D).astype(np.float32)
  w = r.randn(D, V).astype(np.float32) * 0.3
  targets = r.randint(0, V, (B, L)).astype(np.int32)
  targets[0, 5:9] = -1  # not counted
  return h, w, targets


def _value_and_grads(chunk):
  def f(h, w, targets):
    total, count = loss_lib.lm_loss_sum(Head(w), h, targets, chunk=chunk)
    return total, count
  return jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))


@pytest.mark.parametrize('chunk', [8, 16])
def test_chunked_loss_matches_plain(chunk):
  h, w, targets = _inputs()
  (ref, ref_count), ref_g = _value_and_grads(0)(h, w, targets)
  (got, count), g = _value_and_grads(chunk)(h, w, targets)
  assert float(count) == float(ref_count) == B * L - 4
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  for a, b in zip(g, ref_g):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_chunked_loss_on_a_context_sharded_sequence():
  """Chunks are strided, so a sequence sharded over 4 devices stays sharded chunk by chunk."""
  h, w, targets = _inputs()
  mesh = jax.make_mesh((2, 4), ('data', 'context'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sharded = lambda x: jax.device_put(x, NamedSharding(mesh, P('data', 'context')))
  (ref, _), ref_g = _value_and_grads(0)(h, w, targets)
  (got, _), g = _value_and_grads(8)(sharded(h), w, sharded(targets))
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  for a, b in zip(g, ref_g):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_chunk_must_divide_length():
  h, w, targets = _inputs()
  with pytest.raises(ValueError, match='attention.loss_chunk=12'):
    loss_lib.lm_loss_sum(Head(w), h, targets, chunk=12)
