"""SambaY inference: YOCO-style prefill, then token-by-token decoding with constant-size caches.

Ren et al., "Decoder-Hybrid-Decoder Architecture for Efficient Reasoning with Long
Generation" (2025). Prefill runs the layers up to the full-attention layer over the prompt and
the cross-decoder for the last position only, so it stays linear in the prompt beyond the one
full layer. A decode step keeps, per layer:

    Mamba        conv window [B, W-1, E] and scan state [B, E, N]   (constant)
    SWA          a ring buffer of the last `window` keys/values     (constant)
    full attn    THE KV cache [B, S, K, Dh], read by every cross-attention layer
    GMU, cross   nothing; m_t comes fresh from the memory layer in the same step

Decoding assumes one document per row (segment id 1) and all rows at the same position.
"""

import jax
import jax.numpy as jnp

from modeling import decode
from modeling import sambay as sb

Cache = dict


def _attn_dims(model):
  cfg = model.cfg
  return cfg.num_kv_heads, cfg.head_dim, sb.dtype_of(cfg.dtype)


def init_cache(model: sb.SambaY, batch: int, max_len: int) -> Cache:
  """Empty caches for `max_len` positions (what `cache_bytes` measures)."""
  K, Dh, dt = _attn_dims(model)
  per_layer = []
  for role, layer in zip(model.roles, model.layers):
    if role in (sb.MAMBA, sb.MEMORY):
      per_layer.append(layer.mixer.init_state(batch))
    elif role == sb.SWA:
      W = layer.mixer.window
      per_layer.append({'k': jnp.zeros((batch, W, K, Dh), dt), 'v': jnp.zeros((batch, W, K, Dh), dt),
                        'pos': jnp.full((W,), -1, jnp.int32)})   # -1: an empty slot
    elif role == sb.FULL:
      per_layer.append({'k': jnp.zeros((batch, max_len, K, Dh), dt),
                        'v': jnp.zeros((batch, max_len, K, Dh), dt)})
    else:
      per_layer.append({})
  return {'pos': jnp.zeros((), jnp.int32), 'layers': per_layer}


def cache_bytes(cache: Cache) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def _ones(batch, length):
  return jnp.ones((batch, length), jnp.int32)


def _attend_cached(attn, q_BLHD, k_BSKD, v_BSKD, kv_positions_S, q_position, *, window):
  """One query row against cached keys through the attention seam; empty slots have pos -1."""
  B = q_BLHD.shape[0]
  kv_pos_BS = jnp.broadcast_to(kv_positions_S, (B, kv_positions_S.shape[0]))
  return attn.runtime.attend(
      q_BLHD, k_BSKD, v_BSKD, causal=True, window=window,
      q_segment_ids=_ones(B, 1), kv_segment_ids=(kv_pos_BS >= 0).astype(jnp.int32),
      q_positions=jnp.full((B, 1), q_position, jnp.int32), kv_positions=kv_pos_BS)


def _out_proj(attn, o_BLHD):
  return jnp.einsum('blhk,hkd->bld', o_BLHD, attn.wo[...].astype(attn.dtype))


def _window_step(attn, h_B1D, state, p):
  """SWA for one token: write slot p % window, attend over the ring buffer."""
  W = state['k'].shape[1]
  pos_B1 = jnp.full((h_B1D.shape[0], 1), p, jnp.int32)
  q, (k, v) = attn.query(h_B1D, pos_B1), attn.key_value(h_B1D, pos_B1)
  slot = p % W
  state = {'k': jax.lax.dynamic_update_slice_in_dim(state['k'], k.astype(state['k'].dtype), slot, 1),
           'v': jax.lax.dynamic_update_slice_in_dim(state['v'], v.astype(state['v'].dtype), slot, 1),
           'pos': jax.lax.dynamic_update_slice_in_dim(state['pos'], p[None], slot, 0)}
  o = _attend_cached(attn, q, state['k'], state['v'], state['pos'], p, window=attn.window)
  return _out_proj(attn, o), state


def _full_step(attn, h_B1D, state, p):
  """Full attention for one token: append to the shared cache, attend over it."""
  S = state['k'].shape[1]
  pos_B1 = jnp.full((h_B1D.shape[0], 1), p, jnp.int32)
  q, (k, v) = attn.query(h_B1D, pos_B1), attn.key_value(h_B1D, pos_B1)
  state = {'k': jax.lax.dynamic_update_slice_in_dim(state['k'], k.astype(state['k'].dtype), p, 1),
           'v': jax.lax.dynamic_update_slice_in_dim(state['v'], v.astype(state['v'].dtype), p, 1)}
  # Slots past p hold zeros at positions > p: causality masks them.
  o = _attend_cached(attn, q, state['k'], state['v'], jnp.arange(S, dtype=jnp.int32), p, window=0)
  return _out_proj(attn, o), state


def _cross_decoder(model, x_B1D, memory_B1E, kv_cache, p):
  """Layers after the full-attention layer for one position p: GMU(x, m_t) and cross-attention."""
  B, S = x_B1D.shape[0], kv_cache['k'].shape[1]
  kv = (kv_cache['k'], kv_cache['v'])
  start = model.roles.index(sb.FULL) + 1
  for layer in list(model.layers)[start:]:
    h_B1D = layer.norm(x_B1D)
    if layer.role == sb.GMU_ROLE:
      out = layer.mixer(h_B1D, memory_B1E)
    else:
      out = layer.mixer(h_B1D, kv, q_segment_ids=_ones(B, 1), kv_segment_ids=_ones(B, S),
                        q_positions=jnp.full((B, 1), p, jnp.int32),
                        kv_positions=jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)))
    x_B1D = layer.residual_mlp(x_B1D, out)
  return model.logits(model.final_norm(x_B1D))[:, 0]


def prefill(model: sb.SambaY, tokens_BP: jax.Array, max_len: int) -> tuple[jax.Array, Cache]:
  """(logits of the last prompt token [B, V], caches ready to decode position P)."""
  B, P = tokens_BP.shape
  if P >= max_len:
    raise ValueError(f'prompt length {P} leaves no room to decode within max_len={max_len}')
  cache = init_cache(model, B, max_len)
  segment_ids, positions = _ones(B, P), jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  x_BPD = model.embed_tokens(tokens_BP)
  memory = None
  for i, (role, layer) in enumerate(zip(model.roles, model.layers)):
    if role in (sb.GMU_ROLE, sb.CROSS):
      break
    h_BPD = layer.norm(x_BPD)
    if role in (sb.MAMBA, sb.MEMORY):
      out, y_BPE, cache['layers'][i] = layer.mixer.mix(h_BPD, segment_ids=segment_ids)
      if role == sb.MEMORY:
        memory = y_BPE[:, -1:]
    else:
      out, (k, v) = layer.mixer(h_BPD, segment_ids=segment_ids, positions=positions)
      c = cache['layers'][i]
      if role == sb.SWA:   # keep the last `window` positions, each in slot pos % window
        W = c['k'].shape[1]
        keep = jnp.arange(max(0, P - W), P)
        c = {'k': c['k'].at[:, keep % W].set(k[:, keep].astype(c['k'].dtype)),
             'v': c['v'].at[:, keep % W].set(v[:, keep].astype(c['v'].dtype)),
             'pos': c['pos'].at[keep % W].set(keep.astype(jnp.int32))}
      else:                # the shared cache; only the last position continues upward
        c = {'k': c['k'].at[:, :P].set(k.astype(c['k'].dtype)),
             'v': c['v'].at[:, :P].set(v.astype(c['v'].dtype))}
        x_BPD, out = x_BPD[:, -1:], out[:, -1:]
      cache['layers'][i] = c
    x_BPD = layer.residual_mlp(x_BPD, out)
  full = model.roles.index(sb.FULL)
  logits = _cross_decoder(model, x_BPD, memory, cache['layers'][full], jnp.int32(P - 1))
  cache['pos'] = jnp.int32(P)
  return logits, cache


def decode_step(model: sb.SambaY, token_B: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
  """Feeds one token at position cache['pos']; returns its next-token logits [B, V]."""
  p = cache['pos']
  x_B1D = model.embed_tokens(token_B[:, None])
  layers_state = list(cache['layers'])
  memory = None
  for i, (role, layer) in enumerate(zip(model.roles, model.layers)):
    if role in (sb.GMU_ROLE, sb.CROSS):
      break
    h_B1D = layer.norm(x_B1D)
    if role in (sb.MAMBA, sb.MEMORY):
      out, y_B1E, layers_state[i] = layer.mixer.step(h_B1D, layers_state[i])
      if role == sb.MEMORY:
        memory = y_B1E
    elif role == sb.SWA:
      out, layers_state[i] = _window_step(layer.mixer, h_B1D, layers_state[i], p)
    else:
      out, layers_state[i] = _full_step(layer.mixer, h_B1D, layers_state[i], p)
    x_B1D = layer.residual_mlp(x_B1D, out)
  full = model.roles.index(sb.FULL)
  logits = _cross_decoder(model, x_B1D, memory, layers_state[full], p)
  return logits, {'pos': p + 1, 'layers': layers_state}


def dense_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, context: int,
                      itemsize: int, batch: int = 1) -> int:
  """A dense transformer's KV cache: every layer keeps K and V for every position."""
  return 2 * num_layers * num_kv_heads * head_dim * context * itemsize * batch


def decoder(model, *, loops: int | None = None, plan=None) -> decode.Decoder:
  """SambaY's decoder: the self-decoder's constant-size state and one shared KV cache."""
  del model
  if loops is not None:
    raise ValueError(f'--loops={loops} applies to model.name=cart only')
  if plan is not None:
    raise ValueError('a KV cache plan applies to model.name=transformer only')
  return decode.Decoder('sambay', prefill, lambda m, c, tok: decode_step(m, tok, c), _cache_at)


def _cache_at(model, batch: int, max_len: int, position: int):
  cache = init_cache(model, batch, max_len)
  cache['pos'] = jnp.int32(position)
  return cache
