"""Blockwise (flash-style) attention equals plain attention, forward and gradients."""

import jax
import numpy as np
import pytest

from modeling import blockwise, kernels
from modeling.attention import KERNELS, self_attention_kwargs, xla_attention
from tests import attention_data as data


def _loss(attend, q, k, v, seg, pos, causal, window):
  o = attend(q, k, v, causal=causal, window=window, **self_attention_kwargs(seg, pos))
  return (o * data.head_weights()).sum(), o


@pytest.fixture(scope='module')
def compiled():
  """(causal, window) -> jitted fn returning (reference out, grads, blockwise out, grads)."""
  cache = {}

  def get(causal, window):
    if (causal, window) not in cache:
      flash = lambda *a, **kw: kernels.blockwise_attention(*a, block_q=16, block_kv=8, **kw)

      def both(q, k, v, seg, pos):
        grad = lambda fn: jax.value_and_grad(
            lambda a, b, c: _loss(fn, a, b, c, seg, pos, causal, window), (0, 1, 2),
            has_aux=True)(q, k, v)
        (_, o_ref), g_ref = grad(xla_attention)
        (_, o), g = grad(flash)
        return o_ref, g_ref, o, g

      cache[causal, window] = jax.jit(both)
    return cache[causal, window]

  return get


@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('window', [0, 7])
def test_blockwise_matches_plain_attention(compiled, causal, window):
  q, k, v = data.qkv()
  for packed in (False, True):
    seg, pos = data.segments(packed)
    o_ref, g_ref, o, g = compiled(causal, window)(q, k, v, seg, pos)
    np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=0)
    for name, a, b in zip('qkv', g, g_ref):
      np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=f'd{name} packed={packed}')


def test_block_table_skips_only_fully_masked_blocks():
  for packed in (False, True):
    seg, pos = data.segments(packed)
    for causal, window in [(True, 0), (False, 0), (True, 5), (False, 5)]:
      live = np.asarray(blockwise.block_table(seg, seg, pos, pos, causal=causal, window=window,
                                              block_q=8, block_kv=8))
      mask = np.stack([np.asarray(blockwise.attention_mask(
          seg[b:b + 1], seg[b:b + 1], pos[b:b + 1], pos[b:b + 1], causal=causal,
          window=window))[0] for b in range(data.B)]).any(0)
      needed = mask.reshape(8, 8, 8, 8).any(axis=(1, 3))
      assert np.all(live >= needed), 'a block with live entries was skipped'
      if causal and not packed:  # exactly the blocks on and below the diagonal
        np.testing.assert_array_equal(live, np.tril(np.ones((8, 8), bool)) & needed)
      if causal:
        assert live.sum() < live.size / 2 + 8


def test_registered_and_block_errors():
  assert 'blockwise' in KERNELS
  assert blockwise.fit_block(64, 512, 'attention.block_q') == 64
  with pytest.raises(ValueError, match='attention.block_kv=24 does not divide'):
    blockwise.fit_block(64, 24, 'attention.block_kv')
