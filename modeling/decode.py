"""KV-cache decoding (prefill + one-token steps) for the dense transformer under a cache plan.

Serving side of "Stochastic KV Routing: Enabling Adaptive Depth-Wise Cache Sharing"
(Filippova et al., 2026): only the plan's cached layers compute K/V and own a cache; layer l
attends over the cache of mu(l) = plan.sources[l]. `CachePlan.every(L, 1)` is the ordinary
full cache. Sequences are unpacked: position t of every row is token t.
"""

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from modeling import transformer
from modeling.kv_routing import CachePlan


@dataclasses.dataclass(frozen=True)
class Decoder:
  """A family's cache protocol (`modeling/sampling.py` runs it): prefill(model, prompt_BP,
  max_len) -> (last prompt position's logits [B, V], cache), step(model, cache, token_B) ->
  (logits [B, V], cache), cache_at(model, batch, max_len, position) -> an allocated cache as
  if `position` tokens were written (for timing decode steps at a context length). Each
  family's registry entry makes one (`Family.decoder`)."""
  name: str
  prefill: Callable[[Any, jax.Array, int], tuple[jax.Array, Any]]
  step: Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]
  cache_at: Callable[[Any, int, int, int], Any]


def last_logits(out):
  """(logits [B, T, V], cache) -> (logits of the last position [B, V], cache)."""
  logits_BTV, cache = out
  return logits_BTV[:, -1], cache


def decoder(model, *, loops: int | None = None, plan: CachePlan | None = None) -> Decoder:
  """The dense transformer's decoder under a KV cache `plan` (default: the config's
  model.kv_routing plan)."""
  if loops is not None:
    raise ValueError(f'--loops={loops} applies to model.name=cart only')
  plan = plan or CachePlan.from_config(model.cfg)
  return Decoder(f'transformer (cache at layers {",".join(map(str, plan.cached))})',
                 lambda m, t, n: last_logits(prefill(m, t, plan, n)),
                 lambda m, c, tok: decode_step(m, c, tok, plan),
                 lambda m, b, n, at: init_cache(m, plan, b, n).replace(length=jnp.int32(at)))


class KVCache(flax.struct.PyTreeNode):
  k: tuple[jax.Array, ...]   # [B, S_max, K, Dh] per cached layer, in plan.cached order
  v: tuple[jax.Array, ...]
  length: jax.Array          # int32 scalar: tokens written so far


def init_cache(model: transformer.Transformer, plan: CachePlan, batch: int,
               max_len: int) -> KVCache:
  """An empty cache for `plan.cached` layers only; the other layers allocate nothing."""
  cfg = model.cfg
  _check_plan(cfg, plan)
  shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  dtype = transformer.dtype_of(cfg.dtype)
  empty = tuple(jnp.zeros(shape, dtype) for _ in plan.cached)
  return KVCache(k=empty, v=empty, length=jnp.zeros((), jnp.int32))


def cache_bytes(model: transformer.Transformer, plan: CachePlan, batch: int,
                max_len: int) -> int:
  """Bytes of the K/V arrays `init_cache` allocates (shapes only; nothing is allocated)."""
  cache = jax.eval_shape(lambda: init_cache(model, plan, batch, max_len))
  return int(sum(a.size * a.dtype.itemsize for a in (*cache.k, *cache.v)))


def prefill(model: transformer.Transformer, tokens_BT: jax.Array, plan: CachePlan,
            max_len: int | None = None) -> tuple[jax.Array, KVCache]:
  """Runs the prompt; returns logits [B, T, V] and a cache with room for `max_len` tokens."""
  B, T = tokens_BT.shape
  max_len = T if max_len is None else max_len
  if max_len < T:
    raise ValueError(f'max_len={max_len} is shorter than the prompt ({T} tokens)')
  return _extend(model, tokens_BT, init_cache(model, plan, B, max_len), plan)


def decode_step(model: transformer.Transformer, cache: KVCache, token_B: jax.Array,
                plan: CachePlan) -> tuple[jax.Array, KVCache]:
  """Feeds one token per row at position `cache.length`; returns logits [B, V] and the cache."""
  try:
    full = int(cache.length) >= cache.k[0].shape[1]
  except jax.errors.ConcretizationTypeError:  # traced under jit: the caller sizes max_len
    full = False
  if full:
    raise ValueError(f'KV cache is full ({cache.k[0].shape[1]} tokens); prefill with a larger '
                     'max_len')
  logits_B1V, cache = _extend(model, token_B[:, None], cache, plan)
  return logits_B1V[:, 0], cache


def layer_blocks(model: transformer.Transformer) -> list[transformer.Block]:
  """The model's blocks one by one (a scanned stack is sliced per layer)."""
  if not model.cfg.scan_layers:
    return list(model.blocks)
  graphdef, stacked = nnx.split(model.blocks)
  return [nnx.merge(graphdef, jax.tree.map(lambda a, l=l: a[l], stacked))
          for l in range(model.cfg.num_layers)]


def cached_attend_kwargs(batch: int, new: int, slots: int, start) -> dict:
  """Masking inputs for `new` tokens at positions start.. against a cache of `slots` slots:
  slots not yet written are padding (segment 0); the written ones and the new tokens are
  segment 1, and causality comes from the positions."""
  positions_BT = jnp.broadcast_to(start + jnp.arange(new, dtype=jnp.int32), (batch, new))
  kv_positions_BS = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (batch, slots))
  return {'q_segment_ids': jnp.ones((batch, new), jnp.int32),
          'kv_segment_ids': (kv_positions_BS < start + new).astype(jnp.int32),
          'q_positions': positions_BT, 'kv_positions': kv_positions_BS}


def extend_block(block: transformer.Block, x_BTD, kv_cache, start, attend_kwargs,
                 write: bool = True):
  """One pre-norm `transformer.Block` over T new tokens with keys/values from a cache.

  `kv_cache` = (k [B, S, K, Dh], v): when `write`, this block computes its own K/V for the new
  tokens and writes them at `start`; otherwise it reads another layer's cache as it is.
  Returns (x, kv_cache).
  """
  attn = block.attn
  h_BTD = block.attn_norm(x_BTD).astype(attn.dtype)
  positions_BT = attend_kwargs['q_positions']
  q_BTHD = attn.query(h_BTD, positions_BT)
  k_cache, v_cache = kv_cache
  if write:
    k_BTKD, v_BTKD = attn.key_value(h_BTD, positions_BT)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k_BTKD.astype(k_cache.dtype),
                                           (0, start, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v_BTKD.astype(v_cache.dtype),
                                           (0, start, 0, 0))
  o_BTHD = attn.runtime.attend(q_BTHD, k_cache, v_cache, causal=attn.causal,
                               window=attn.window, **attend_kwargs)
  x_BTD = x_BTD + jnp.einsum('blhk,hkd->bld', o_BTHD, attn.wo[...].astype(attn.dtype))
  x_BTD = x_BTD + block.mlp(block.mlp_norm(x_BTD))
  return x_BTD, (k_cache, v_cache)


def _extend(model, tokens_BT, cache: KVCache, plan: CachePlan):
  """Appends T tokens at positions cache.length + t: the same pre-norm block as
  transformer.Block, with queries over the new tokens and keys over the cache."""
  _check_plan(model.cfg, plan)
  B, T = tokens_BT.shape
  start = cache.length
  attend_kwargs = cached_attend_kwargs(B, T, cache.k[0].shape[1], start)
  slot = {l: i for i, l in enumerate(plan.cached)}
  k_cache, v_cache = list(cache.k), list(cache.v)

  x_BTD = model.embed(tokens_BT, transformer.dtype_of(model.cfg.dtype))
  for l, block in enumerate(layer_blocks(model)):
    i = slot[plan.sources[l]]
    x_BTD, (k_cache[i], v_cache[i]) = extend_block(
        block, x_BTD, (k_cache[i], v_cache[i]), start, attend_kwargs,
        write=plan.sources[l] == l)
  logits_BTV = model.logits(model.final_norm(x_BTD))
  return logits_BTV, KVCache(k=tuple(k_cache), v=tuple(v_cache), length=start + T)


def _check_plan(cfg, plan: CachePlan) -> None:
  if plan.num_layers != cfg.num_layers:
    raise ValueError(f'cache plan covers {plan.num_layers} layers; model.num_layers='
                     f'{cfg.num_layers}')
