"""Stochastic cross-layer KV routing: random K/V sources in training, shared caches in serving.

Implements "Stochastic KV Routing: Enabling Adaptive Depth-Wise Cache Sharing" (Filippova,
Grangier, Cuturi, Monteiro, 2026). In training, layer l attends with its own K/V with
probability p and otherwise with the K/V of an earlier layer l' drawn uniformly; queries are
always its own. At inference a `CachePlan` keeps a cache only at a set S of layers, and layer l
reads mu(l) = max{j in S : j <= l}, so one trained model serves every retention level.

Layers are counted from 0 here (the paper counts from 1); layer 0 always uses its own K/V.
A routed block is a pre-norm block with `attn_norm`, `attn` (a `transformer.Attention`) and
`__call__(x, *, segment_ids, positions, kv)` -> (x, kv), as `transformer.Block` is.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# Folded into the step key so routing draws never coincide with other users of the step's RNG.
_ROUTING_STREAM = 0x4B56


def draw_sources(rng: jax.Array, num_layers: int, p: float) -> jax.Array:
  """int32 [L]: sources[l] = l with probability p, else uniform over {0, ..., l-1}.

  One draw per layer per step, shared by the whole batch. It depends on the step key only,
  never on the local batch, so every data-parallel replica draws the same routes.
  """
  keep_key, source_key = jax.random.split(jax.random.fold_in(rng, _ROUTING_STREAM))
  layer_L = jnp.arange(num_layers, dtype=jnp.int32)
  keep_L = jax.random.bernoulli(keep_key, p, (num_layers,)) | (layer_L == 0)
  earlier_L = jax.random.randint(source_key, (num_layers,), 0, jnp.maximum(layer_L, 1))
  return jnp.where(keep_L, layer_L, earlier_L).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class CachePlan:
  """A static inference plan: `sources[l]` = mu(l), the layer whose K/V (cache) layer l reads."""
  sources: tuple[int, ...]

  @classmethod
  def every(cls, num_layers: int, g: int) -> 'CachePlan':
    """Grouped sharing: layers 0, g, 2g, ... keep a cache; the others read their group's leader."""
    if g < 1:
      raise ValueError(f'model.kv_routing.cache_every={g}; must be >= 1 (1 = every layer)')
    return cls(tuple(l - l % g for l in range(num_layers)))

  @classmethod
  def of_layers(cls, num_layers: int, cached) -> 'CachePlan':
    """An explicit cache set S; every other layer reads the nearest cached layer below it."""
    cached = sorted({int(l) for l in cached})
    if not cached or cached[0] != 0 or cached[-1] >= num_layers:
      raise ValueError(f'model.kv_routing.cache_layers={cached} must include layer 0 (it has no '
                       f'layer below to read) and lie in 0..{num_layers - 1}')
    return cls(tuple(max(j for j in cached if j <= l) for l in range(num_layers)))

  @classmethod
  def from_config(cls, cfg: Any) -> 'CachePlan':
    """`model.kv_routing.cache_layers` ('0,2,3') if set, else every `cache_every`-th layer."""
    spec = cfg.kv_routing.cache_layers.strip()
    if spec:
      try:
        cached = [int(s) for s in spec.split(',')]
      except ValueError:
        raise ValueError(f'model.kv_routing.cache_layers={spec!r}; expected comma-separated '
                         "layer indices such as '0,2,3'") from None
      return cls.of_layers(cfg.num_layers, cached)
    return cls.every(cfg.num_layers, cfg.kv_routing.cache_every)

  @property
  def num_layers(self) -> int:
    return len(self.sources)

  @property
  def cached(self) -> tuple[int, ...]:
    """The layers that keep a cache (and compute K/V), in order."""
    return tuple(l for l, s in enumerate(self.sources) if s == l)

  @property
  def retention(self) -> float:
    return len(self.cached) / self.num_layers

  @property
  def is_full(self) -> bool:
    return len(self.cached) == self.num_layers


@dataclasses.dataclass(frozen=True)
class Routes:
  """Where each layer takes its K/V from in one forward pass.

  `sources` is a traced int32 [L] in training (a fresh draw each step) or a `CachePlan`.
  """
  sources: jax.Array | CachePlan
  stop_gradient: bool = False


def layer_routes(cfg: Any, rng: jax.Array | None, plan: CachePlan | None = None) -> Routes | None:
  """The routes for one forward pass of a model with config `cfg`; None = every layer its own K/V.

  An explicit `plan` wins. Otherwise training (rng given) draws routes when p < 1, and eval
  (rng None) follows the config's cache plan, so eval loss is that of the configured serving plan.
  """
  kv = cfg.kv_routing
  if not 0.0 <= kv.p <= 1.0:
    raise ValueError(f'model.kv_routing.p={kv.p}; must lie in [0, 1] (1 = routing off)')
  if plan is None and rng is not None:
    if kv.p == 1.0:
      return None
    return Routes(draw_sources(rng, cfg.num_layers, kv.p), kv.stop_gradient)
  plan = plan if plan is not None else CachePlan.from_config(cfg)
  if plan.num_layers != cfg.num_layers:
    raise ValueError(f'cache plan covers {plan.num_layers} layers; model.num_layers='
                     f'{cfg.num_layers}')
  return None if plan.is_full else Routes(plan, kv.stop_gradient)


def own_kv(block, x_BLD, positions_BL):
  """The K/V a pre-norm block's attention would compute from its input (after RoPE)."""
  attn = block.attn
  return attn.key_value(block.attn_norm(x_BLD).astype(attn.dtype), positions_BL)


def _routed_layer(block, x_BLD, borrowed_kv, keep, *, stop_gradient: bool, segment_ids,
                  positions, attn_plan=None):
  """One layer: attend with its own K/V if `keep`, else with `borrowed_kv`; returns its own K/V.

  Every layer computes its own K/V (it may be a later layer's source); the borrowed branch
  passes gradient into the source layer unless `stop_gradient`.
  """
  kv = own = own_kv(block, x_BLD, positions)
  if borrowed_kv is not None:
    if stop_gradient:
      borrowed_kv = jax.lax.stop_gradient(borrowed_kv)
    kv = jax.tree.map(lambda o, b: jnp.where(keep, o, b), own, borrowed_kv)
  x_BLD, _ = block(x_BLD, segment_ids=segment_ids, positions=positions, kv=kv,
                   attn_plan=attn_plan)
  return x_BLD, own


def apply_routed_blocks(blocks, x_BLD, routes: Routes, *, scanned: bool,
                        policy: Callable | None, segment_ids, positions, attn_plan=None):
  """`transformer.apply_blocks` with K/V routed by `routes`.

  Every layer's own K/V goes into a stacked buffer [L, B, S, K, Dh] (the scan carry under
  scan) that later layers index by their drawn source. Remat wraps only the layer, so the
  backward pass keeps one borrowed K/V per layer, not one buffer per layer.
  """
  if isinstance(routes.sources, CachePlan) and not scanned:
    return _apply_plan_unrolled(blocks, x_BLD, routes.sources, segment_ids=segment_ids,
                                positions=positions, attn_plan=attn_plan)
  sources = routes.sources
  sources_L = jnp.asarray(sources.sources if isinstance(sources, CachePlan) else sources,
                          jnp.int32)

  def layer(block, x, borrowed, keep):
    return _routed_layer(block, x, borrowed, keep, stop_gradient=routes.stop_gradient,
                         segment_ids=segment_ids, positions=positions, attn_plan=attn_plan)

  num_layers = sources_L.shape[0]
  attn = blocks.attn if scanned else blocks[0].attn
  kv_shape = (num_layers, *x_BLD.shape[:2], *attn.wk.shape[-2:])  # wk: [(L,) D, K, Dh]
  buffer = (jnp.zeros(kv_shape, attn.dtype), jnp.zeros(kv_shape, attn.dtype))

  def route(layer_fn, block, x, buffer, l, source):
    borrowed = tuple(b[source] for b in buffer)
    x, own = layer_fn(block, x, borrowed, source == l)
    return x, tuple(b.at[l].set(o) for b, o in zip(buffer, own))

  if not scanned:
    step = nnx.remat(layer, policy=policy) if policy is not None else layer
    for l, block in enumerate(blocks):
      x_BLD, buffer = route(step, block, x_BLD, buffer, l, sources_L[l])
    return x_BLD

  graphdef, stacked = nnx.split(blocks)

  def layer_of_state(layer_state, x, borrowed, keep):
    return layer(nnx.merge(graphdef, layer_state), x, borrowed, keep)

  if policy is not None:
    layer_of_state = jax.checkpoint(layer_of_state, policy=policy, prevent_cse=False)

  def body(carry, xs):
    layer_state, l, source = xs
    return route(layer_of_state, layer_state, *carry, l, source), None

  (x_BLD, _), _ = jax.lax.scan(body, (x_BLD, buffer),
                               (stacked, jnp.arange(num_layers), sources_L))
  return x_BLD


def _apply_plan_unrolled(blocks, x_BLD, plan: CachePlan, *, segment_ids, positions,
                         attn_plan=None):
  """Eval under a static plan: layers outside the cache set never compute K/V."""
  kv_of = {}
  for l, block in enumerate(blocks):
    source = plan.sources[l]
    x_BLD, kv = block(x_BLD, segment_ids=segment_ids, positions=positions,
                      kv=None if source == l else kv_of[source], attn_plan=attn_plan)
    if source == l:
      kv_of[l] = kv
  return x_BLD
