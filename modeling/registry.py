"""`config.model.name` -> how to build that family and count its FLOPs."""

import dataclasses
from typing import Any, Callable

import ml_collections
from flax import nnx

from modeling import cart, sambay, transformer


@dataclasses.dataclass(frozen=True)
class Family:
  build: Callable[..., nnx.Module]            # build(cfg, *, rngs, runtime) -> model
  forward_flops_per_token: Callable[..., float]  # f(cfg, seq_len, causal=True) -> FLOPs
  # Layer types whose token mixing follows the *array order* of tokens (a scan, a causal
  # conv, segment starts found by adjacency) instead of masking by positions as attention
  # does. Splitting or permuting a sequence (context parallelism, zigzag, hybrid DP groups)
  # changes their result unless they run through a seam that knows the split.
  order_dependent_layers: tuple[str, ...] = ()
  # True when those layers take every order-dependent op from `Runtime.recurrence`, so a
  # context-parallel recurrence (parallelism/context/scan.py) keeps them exact.
  uses_recurrence_seam: bool = False
  # The config key of the family's sliding-window attention span (0 or absent = none).
  window_key: str = 'model.sliding_window'
  # planner_cost(cfg) -> (forward FLOPs per token, per causal query-key pair) of one document:
  # the planners' cost model is 3 x (linear x s + pair x s(s+1)/2) for forward + backward.
  planner_cost: Callable[[Any], tuple[float, float]] | None = None


FAMILIES: dict[str, Family] = {
    'transformer': Family(transformer.Transformer, transformer.forward_flops_per_token,
                          planner_cost=transformer.planner_cost),
    'cart': Family(cart.Cart, cart.forward_flops_per_token, planner_cost=cart.planner_cost),
    'sambay': Family(sambay.SambaY, sambay.forward_flops_per_token,
                     order_dependent_layers=('mamba',), uses_recurrence_seam=True,
                     window_key='model.sambay.window', planner_cost=sambay.planner_cost),
}


def get_family(name: str) -> Family:
  if name not in FAMILIES:
    raise ValueError(f'model.name={name!r} is not registered; valid: {sorted(FAMILIES)}')
  return FAMILIES[name]


def build_model(model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
                runtime: transformer.Runtime = transformer.Runtime()) -> nnx.Module:
  """Builds `model.name` from a (frozen, hashable) copy of the model config."""
  cfg: Any = ml_collections.FrozenConfigDict(model_config)
  return get_family(cfg.name).build(cfg, rngs=rngs, runtime=runtime)
