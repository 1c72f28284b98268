"""`config.model.name` -> everything family-specific, in one entry per family.

The only place outside a family's own modules that knows a family: how to build it, count its
FLOPs, which layers follow token order, its decode/cache protocol, its recurrence and window
settings, its training diagnostics. Callers (sampling, telemetry, composition, the hybrid-DP
program) ask the entry and never compare a family's name or type. Adding a family = a new
model module + one entry in `FAMILIES` (docs/architecture.md has a worked example).
"""

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx

from modeling import cart, cart_decode, decode, sambay, sambay_decode, ssm, transformer
from modeling.runtime import Runtime


def _no_window(cfg: Any) -> int:
  del cfg
  return 0


def _sliding_window(cfg: Any) -> int:
  return cfg.sliding_window


def _sambay_scan(cfg: Any) -> tuple[ssm.ScanFn, int]:
  s = cfg.sambay
  return ssm.make_scan(s.scan_impl, s.scan_chunk), s.scan_chunk


@dataclasses.dataclass(frozen=True)
class Family:
  build: Callable[..., nnx.Module]            # build(cfg, *, rngs, runtime) -> model
  forward_flops_per_token: Callable[..., float]  # f(cfg, seq_len, causal=True) -> FLOPs
  # The cache protocol for sampling: decoder(model, *, loops=None, plan=None) -> Decoder
  # (modeling/decode.py); arguments a family does not take are refused there. None: the
  # family cannot sample with a cache.
  decoder: Callable[..., decode.Decoder] | None = None
  # Layer types whose token mixing follows the *array order* of tokens (a scan, a causal
  # conv, segment starts found by adjacency) instead of masking by positions as attention
  # does. Splitting or permuting a sequence (context parallelism, zigzag, hybrid DP groups)
  # changes their result unless they run through a seam that knows the split.
  order_dependent_layers: tuple[str, ...] = ()
  # The single-device scan and its chunk for those layers, handed to the distributed
  # recurrences (context-parallel scan, hybrid-DP groups): scan(cfg) -> (scan_fn, chunk).
  # Set exactly when the layers take every order-dependent op from `Runtime.recurrence`, so
  # a context-parallel recurrence (parallelism/context/scan.py) keeps them exact.
  recurrence_scan: Callable[[Any], tuple[ssm.ScanFn, int]] | None = None
  # The config key of the family's sliding-window attention span (0 or absent = none).
  window_key: str = 'model.sliding_window'
  # The window the attention-balance telemetry counts keys with: balance_window(cfg) -> int.
  balance_window: Callable[[Any], int] = _sliding_window
  # Training diagnostics on a batch, logged each log row (training/metrics/telemetry.py):
  # f(model, tokens, *, segment_ids, positions, attn_plan) -> {name: scalar}; None: none.
  batch_diagnostics: Callable[..., dict[str, jax.Array]] | None = None
  # One line for the training log at start-up: describe(cfg) -> str; None: nothing.
  describe: Callable[[Any], str] | None = None

  @property
  def uses_recurrence_seam(self) -> bool:
    return self.recurrence_scan is not None

  # planner_cost(cfg) -> (forward FLOPs per token, per causal query-key pair) of one document:
  # the planners' cost model is 3 x (linear x s + pair x s(s+1)/2) for forward + backward.
  planner_cost: Callable[[Any], tuple[float, float]] | None = None
  # The planner's scan term (parallelism/planner): forward FLOPs per token spent in recurrence
  # scans, recurrence_flops(cfg) -> float (part of forward_flops_per_token), and a probe the
  # calibration times: scan_probe(cfg, length) -> (loss_fn, args, forward FLOPs of one call).
  recurrence_flops: Callable[[Any], float] | None = None
  scan_probe: Callable[[Any, int], tuple[Callable, tuple, float]] | None = None


FAMILIES: dict[str, Family] = {
    'transformer': Family(transformer.Transformer, transformer.forward_flops_per_token,
                          decoder=decode.decoder, planner_cost=transformer.planner_cost),
    'cart': Family(cart.Cart, cart.forward_flops_per_token, decoder=cart_decode.decoder,
                   batch_diagnostics=cart.loop_state_rms, describe=cart.Cart.describe,
                   planner_cost=cart.planner_cost),
    # Its attention-balance telemetry counts full causal prefixes (window 0).
    'sambay': Family(sambay.SambaY, sambay.forward_flops_per_token,
                     decoder=sambay_decode.decoder, order_dependent_layers=('mamba',),
                     recurrence_scan=_sambay_scan, window_key='model.sambay.window',
                     balance_window=_no_window, planner_cost=sambay.planner_cost,
                     recurrence_flops=sambay.recurrence_flops_per_token,
                     scan_probe=sambay.scan_probe),
}


def get_family(name: str) -> Family:
  if name not in FAMILIES:
    raise ValueError(f'model.name={name!r} is not registered; valid: {sorted(FAMILIES)}')
  return FAMILIES[name]


def build_model(model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
                runtime: Runtime = Runtime()) -> nnx.Module:
  """Builds `model.name` from a (frozen, hashable) copy of the model config."""
  cfg: Any = ml_collections.FrozenConfigDict(model_config)
  return get_family(cfg.name).build(cfg, rngs=rngs, runtime=runtime)
