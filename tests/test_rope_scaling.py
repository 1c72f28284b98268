"""RoPE scaling (modeling/rope.py): each type equals a numpy port of Hugging Face transformers'
`_compute_*_parameters` at positions up to 131,072, invalid settings are one-line errors naming
the key, and every rotary family plus the decode cache uses the scaled frequencies."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from modeling import layers, registry, rope, sampling

DIM, THETA = 64, 10_000.0
POSITIONS = np.array([0, 1, 7, 255, 4095, 8191, 32_767, 65_536, 100_003, 131_071, 131_072])


# --- numpy ports of transformers' modeling_rope_utils (names as there) ---

def hf_default(base_, dim):
  return 1.0 / (base_ ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim)), 1.0


def hf_linear(base_, dim, factor):
  inv, att = hf_default(base_, dim)
  return inv / factor, att


def hf_ntk_static(base_, dim, factor):
  return hf_default(base_ * factor ** (dim / (dim - 2)), dim)


def hf_yarn(base_, dim, factor, original_max_position_embeddings, beta_fast=32, beta_slow=1,
            attention_factor=None, truncate=True):
  def get_mscale(scale, mscale=1):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

  if attention_factor is None:
    attention_factor = get_mscale(factor)

  def find_correction_dim(num_rotations):
    return (dim * math.log(original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
        2 * math.log(base_))

  low, high = find_correction_dim(beta_fast), find_correction_dim(beta_slow)
  if truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
  pos_freqs = base_ ** (np.arange(0, dim, 2).astype(np.float64) / dim)
  inv_extrapolation, inv_interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
  extrapolation_factor = 1 - ramp
  inv = inv_interpolation * (1 - extrapolation_factor) + inv_extrapolation * extrapolation_factor
  return inv, attention_factor


def hf_llama3(base_, dim, factor, low_freq_factor, high_freq_factor, old_context_len):
  inv_freq, att = hf_default(base_, dim)
  low_freq_wavelen = old_context_len / low_freq_factor
  high_freq_wavelen = old_context_len / high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth_factor = (old_context_len / wavelen - low_freq_factor) / (
      high_freq_factor - low_freq_factor)
  smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
  is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(is_medium, smoothed, inv_freq_llama), att


def hf_longrope(base_, dim, factor, original_max_position_embeddings, long_factor):
  attention_factor = (1.0 if factor <= 1 else
                      math.sqrt(1 + math.log(factor) / math.log(original_max_position_embeddings)))
  shape = np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim
  return 1.0 / (np.asarray(long_factor, np.float64) * base_ ** shape), attention_factor


LONG_FACTOR = tuple(1.0 + 0.25 * i for i in range(DIM // 2))
CASES = {
    'none': ({}, lambda: hf_default(THETA, DIM)),
    'linear': ({'factor': 8.0}, lambda: hf_linear(THETA, DIM, 8.0)),
    'ntk': ({'factor': 8.0}, lambda: hf_ntk_static(THETA, DIM, 8.0)),
    'yarn': ({'factor': 16.0, 'original_max_position_embeddings': 8192},
             lambda: hf_yarn(THETA, DIM, 16.0, 8192)),
    'llama3': ({'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                'original_max_position_embeddings': 8192},
               lambda: hf_llama3(THETA, DIM, 8.0, 1.0, 4.0, 8192)),
    'longrope': ({'factor': 16.0, 'original_max_position_embeddings': 8192,
                  'long_factor': LONG_FACTOR},
                 lambda: hf_longrope(THETA, DIM, 16.0, 8192, LONG_FACTOR)),
}


def reference_rotary(x, positions, inv_freq, attention_factor):
  """transformers' apply_rotary_pos_emb with float32 cos/sin (rotate_half layout)."""
  inv = inv_freq.astype(np.float32)
  freqs = positions.astype(np.float32)[..., None] * inv                       # [B, L, F]
  emb = np.concatenate([freqs, freqs], -1)
  cos = (np.cos(emb) * np.float32(attention_factor)).astype(np.float32)[:, :, None]
  sin = (np.sin(emb) * np.float32(attention_factor)).astype(np.float32)[:, :, None]
  x1, x2 = x[..., :DIM // 2], x[..., DIM // 2:]
  rotate_half = np.concatenate([-x2, x1], -1)
  return x * cos + rotate_half * sin


@pytest.mark.parametrize('kind', list(CASES))
def test_matches_reference_formulas_to_131k(kind):
  params, ref = CASES[kind]
  r = rope.make(THETA, {'type': kind, **params})
  inv_ref, att_ref = ref()
  np.testing.assert_allclose(r.inv_freq(DIM), inv_ref.astype(np.float32), rtol=1e-7, atol=0)
  assert r.scale() == pytest.approx(att_ref, rel=1e-12)
  x = np.random.default_rng(0).uniform(-1, 1, (2, len(POSITIONS), 3, DIM)).astype(np.float32)
  pos = np.stack([POSITIONS, POSITIONS[::-1]])
  got = np.asarray(layers.rotary(jnp.asarray(x), jnp.asarray(pos, jnp.int32), r))
  want = reference_rotary(x, pos, inv_ref, att_ref)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  if kind != 'none':   # the scaling changes the function beyond L0 (low frequencies)
    plain = np.asarray(layers.rotary(jnp.asarray(x), jnp.asarray(pos, jnp.int32), THETA))
    assert np.abs(plain - got).max() > 1e-2


def test_scaling_types_differ_from_plain_frequencies():
  plain = rope.Rope(THETA).inv_freq(DIM)
  for kind, (params, _) in CASES.items():
    inv = rope.make(THETA, {'type': kind, **params}).inv_freq(DIM)
    if kind == 'none':
      np.testing.assert_array_equal(inv, plain)
    elif kind in ('yarn', 'llama3'):   # high frequencies kept, low ones divided by the factor
      assert inv[0] == pytest.approx(plain[0]) and inv[-1] == pytest.approx(plain[-1] / 16
                                                                             if kind == 'yarn'
                                                                             else plain[-1] / 8)


def test_transformers_equal_when_installed():
  mru = pytest.importorskip('transformers.modeling_rope_utils')
  from transformers import LlamaConfig
  for kind, (params, ref) in CASES.items():
    if kind in ('none', 'ntk', 'longrope'):
      continue
    scaling = {'rope_type': kind, **params}
    cfg = LlamaConfig(hidden_size=DIM * 2, num_attention_heads=2, head_dim=DIM, rope_theta=THETA,
                      rope_scaling=scaling, max_position_embeddings=131_072)
    fn = mru.ROPE_INIT_FUNCTIONS[kind]
    inv, att = fn(cfg, 'cpu')
    r = rope.make(THETA, {'type': kind, **params})
    np.testing.assert_allclose(r.inv_freq(DIM), inv.numpy(), rtol=1e-6)
    assert r.scale() == pytest.approx(att, rel=1e-6)


@pytest.mark.parametrize('settings,key', [
    ({'type': 'dynamic'}, 'type'),
    ({'type': 'linear', 'factor': 0.5}, 'factor'),
    ({'type': 'yarn', 'factor': 4.0}, 'original_max_position_embeddings'),
    ({'type': 'llama3', 'factor': 8.0, 'original_max_position_embeddings': 8192,
      'low_freq_factor': 4.0, 'high_freq_factor': 1.0}, 'high_freq_factor'),
    ({'type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 256,
      'beta_fast': 1.0, 'beta_slow': 32.0}, 'beta_fast'),
    ({'type': 'longrope', 'factor': 4.0, 'original_max_position_embeddings': 256,
      'long_factor': 'a,b'}, 'long_factor'),
])
def test_invalid_settings_name_the_key(settings, key):
  with pytest.raises(ValueError, match=rf'^model\.rope_scaling\.{key}=') as e:
    rope.make(THETA, settings)
  assert '\n' not in str(e.value)


def test_longrope_factor_count_checked_against_head_dim():
  m = _model_config('transformer', 'longrope')
  m.rope_scaling.long_factor = '1,2,3'
  with pytest.raises(ValueError, match=r'model\.rope_scaling\.long_factor=.*needs 8 factors'):
    registry.build_model(m, rngs=nnx.Rngs(0))


def _model_config(family, kind):
  m = base.get_config().model
  m.update(num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
  m.init_std = 0.2
  if family == 'cart':
    m.name = 'cart'
    m.cart.update(prelude_layers=1, coda_layers=1, loops=2, max_loops=4)
  if family == 'sambay':
    from configs import sambay_tiny
    m = sambay_tiny.get_config().model
    m.update(num_layers=4, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
    m.sambay.nope, m.rope_theta = False, 10_000.0
  m.rope_scaling.update(type=kind, factor=4.0, original_max_position_embeddings=8)
  if kind == 'longrope':
    m.rope_scaling.long_factor = ','.join(str(1 + i) for i in range(8))
  return m


@pytest.mark.parametrize('family', ['transformer', 'cart', 'sambay'])
def test_every_rotary_layer_and_the_decode_cache_use_the_scaling(family, monkeypatch):
  """Greedy generation through the cache equals the full forward's arg-max with yarn scaling,
  and the scaled model differs from the unscaled one (the scaling reaches every family)."""
  m = _model_config(family, 'yarn')
  model = registry.build_model(m, rngs=nnx.Rngs(3))
  prompt = np.random.default_rng(0).integers(0, 256, (2, 12), dtype=np.int32)
  out = sampling.generate(model, prompt, 6, sampling.Sampler(temperature=0.0))
  seq = jnp.asarray(np.concatenate([prompt, out.tokens], 1)[:, :-1])
  B, L = seq.shape
  pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  h = model(seq, segment_ids=jnp.ones((B, L), jnp.int32), positions=pos)
  np.testing.assert_array_equal(out.tokens, np.asarray(jnp.argmax(model.logits(h), -1))[:, 11:])
  seen = []
  real = layers.rotary
  monkeypatch.setattr(layers, 'rotary', lambda x, p, r: seen.append(r) or real(x, p, r))
  model(seq, segment_ids=jnp.ones((B, L), jnp.int32), positions=pos)
  assert seen and all(r.type == 'yarn' and r.factor == 4.0 for r in seen)
