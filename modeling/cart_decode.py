"""CART inference: prefill and one-token steps with caches for the prelude, the anchor and the coda.

"CART: Context-Anchored Recurrent Transformer" (Capps, 2026). What a decoding step keeps:

    prelude layer p   its own K/V [B, S, K, Dh] (GQA), or its latent c [B, S, C] and rotary
                      key k_R [B, S, R] (MLA, modeling/mla.py)
    anchor            K/V of e = Prelude(Emb(tokens)) through the d/4 latent [B, S, K, Dh]
    looped core       nothing: the state of token t after loop r depends only on e[t] and the
                      anchor K/V of positions <= t, so every loop of a new token reads the cache
    coda layer c      its own cache, as a prelude layer

so the cache does not grow with R, and R (`loops`) may be chosen at inference, as in the
forward pass (any R up to model.cart.max_loops). Sequences are unpacked: position t of every
row is token t, all rows at the same position.
"""

import flax.struct
import jax
import jax.numpy as jnp

from modeling import cart as cart_lib
from modeling import decode, mla
from modeling.cart_core import loop_index_table
from modeling.transformer import dtype_of


class CartCache(flax.struct.PyTreeNode):
  prelude: tuple[tuple[jax.Array, jax.Array], ...]   # (k, v) or MLA (c, k_R) per layer
  anchor: tuple[jax.Array, jax.Array]                # (k, v) of the anchor
  coda: tuple[tuple[jax.Array, jax.Array], ...]
  length: jax.Array                                  # int32 scalar: tokens written so far


def _check(model: cart_lib.Cart) -> None:
  if model.cfg.cart.recompute_kv:
    raise ValueError('CART decoding reads one anchor K/V cache; model.cart.recompute_kv=True '
                     'would need a cache per loop iteration; valid for decoding: False')


def init_cache(model: cart_lib.Cart, batch: int, max_len: int) -> CartCache:
  cfg = model.cfg
  _check(model)
  dt = dtype_of(cfg.dtype)
  shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  pair = lambda: (jnp.zeros(shape, dt), jnp.zeros(shape, dt))
  return CartCache(prelude=tuple(_layer_cache(b, cfg, pair, batch, max_len) for b in model.prelude),
                   anchor=pair(),
                   coda=tuple(_layer_cache(b, cfg, pair, batch, max_len) for b in model.coda),
                   length=jnp.zeros((), jnp.int32))


# --- MLA or GQA self-attention layers (model.cart.prelude_attention / coda_attention) ---

def _layer_cache(block, cfg, pair, batch: int, max_len: int):
  if isinstance(block, mla.MLABlock):
    return mla.init_cache(cfg, batch, max_len)
  return pair()


def _extend_layer(block, x_BTD, cache, start, kw):
  if isinstance(block, mla.MLABlock):
    return mla.extend_block(block, x_BTD, cache, start, kw)
  return decode.extend_block(block, x_BTD, cache, start, kw)


def cache_bytes(cache: CartCache) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)
                 if x.ndim > 0))


def _core_cached(core, hh_BTD, k_cache, v_cache, attend_kwargs):
  """CoreBlock.__call__ with queries over the new tokens and keys over the anchor cache."""
  dt = core.dtype
  q_BTHD = jnp.einsum('bld,dhk->blhk', core.attn_norm(hh_BTD).astype(dt), core.wq[...].astype(dt))
  o_BTHD = core.runtime.attend(q_BTHD, k_cache, v_cache, causal=True, **attend_kwargs)
  u_BTD = hh_BTD + jnp.einsum('blhk,hkd->bld', o_BTHD, core.wo[...].astype(dt))
  return u_BTD + core.mlp(core.mlp_norm(u_BTD))


def _extend(model: cart_lib.Cart, tokens_BT, cache: CartCache, loops: int | None):
  B, T = tokens_BT.shape
  R = model.num_loops(training=False, loops=loops)
  start = cache.length
  kw = decode.cached_attend_kwargs(B, T, cache.anchor[0].shape[1], start)

  x_BTD = model.embed(tokens_BT, dtype_of(model.cfg.dtype))
  prelude = []
  for block, kv in zip(model.prelude, cache.prelude):
    x_BTD, kv = _extend_layer(block, x_BTD, kv, start, kw)
    prelude.append(kv)
  e_BTD = x_BTD
  k_new, v_new = model.kv_proj(e_BTD)
  k_anchor = jax.lax.dynamic_update_slice(cache.anchor[0], k_new.astype(cache.anchor[0].dtype),
                                          (0, start, 0, 0))
  v_anchor = jax.lax.dynamic_update_slice(cache.anchor[1], v_new.astype(cache.anchor[1].dtype),
                                          (0, start, 0, 0))
  c = model.cfg.cart
  pe_RC = jnp.asarray(loop_index_table(c.max_loops, c.loop_embed_dim)) if c.loop_embedding \
      else None
  buf = (e_BTD,) * model.glue.slots
  for r in range(R):
    hh_BTD = model.glue.blend(buf, None if pe_RC is None else pe_RC[r])
    f_BTD = _core_cached(model.core_at(r), hh_BTD, k_anchor, v_anchor, kw)
    buf = (model.glue.gate(hh_BTD, f_BTD),) + buf[:-1]
  x_BTD = buf[0]
  coda = []
  for block, kv in zip(model.coda, cache.coda):
    x_BTD, kv = _extend_layer(block, x_BTD, kv, start, kw)
    coda.append(kv)
  logits_BTV = model.logits(model.final_norm(x_BTD))
  return logits_BTV, CartCache(prelude=tuple(prelude), anchor=(k_anchor, v_anchor),
                               coda=tuple(coda), length=start + T)


def prefill(model: cart_lib.Cart, tokens_BT: jax.Array, max_len: int,
            loops: int | None = None) -> tuple[jax.Array, CartCache]:
  """Runs the prompt; returns logits [B, T, V] and caches with room for `max_len` tokens."""
  B, T = tokens_BT.shape
  if max_len < T:
    raise ValueError(f'max_len={max_len} is shorter than the prompt ({T} tokens)')
  return _extend(model, tokens_BT, init_cache(model, B, max_len), loops)


def decode_step(model: cart_lib.Cart, cache: CartCache, token_B: jax.Array,
                loops: int | None = None) -> tuple[jax.Array, CartCache]:
  """Feeds one token per row at position `cache.length`; returns logits [B, V] and the caches."""
  logits_B1V, cache = _extend(model, token_B[:, None], cache, loops)
  return logits_B1V[:, 0], cache


def decoder(model, *, loops: int | None = None, plan=None) -> decode.Decoder:
  """CART's decoder with R = `loops` (default: model.cart.eval_loops, else loops)."""
  if plan is not None:
    raise ValueError('a KV cache plan applies to model.name=transformer only')
  model.num_loops(training=False, loops=loops)   # a bad R fails here, before compiling
  R = loops or model.cfg.cart.eval_loops or model.cfg.cart.loops
  return decode.Decoder(f'cart (R={R})',
                        lambda m, t, n: decode.last_logits(prefill(m, t, n, loops)),
                        lambda m, c, tok: decode_step(m, c, tok, loops),
                        lambda m, b, n, at: init_cache(m, b, n).replace(length=jnp.int32(at)))
