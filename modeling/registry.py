"""`config.model.name` -> how to build that family and count its FLOPs."""

import dataclasses
from typing import Any, Callable

import ml_collections
from flax import nnx

from modeling import cart, transformer


@dataclasses.dataclass(frozen=True)
class Family:
  build: Callable[..., nnx.Module]            # build(cfg, *, rngs, runtime) -> model
  forward_flops_per_token: Callable[..., float]  # f(cfg, seq_len, causal=True) -> FLOPs


FAMILIES: dict[str, Family] = {
    'transformer': Family(transformer.Transformer, transformer.forward_flops_per_token),
    'cart': Family(cart.Cart, cart.forward_flops_per_token),
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
