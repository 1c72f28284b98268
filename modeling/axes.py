"""Logical axis names: the only sharding vocabulary model code speaks.

Models annotate parameters and activations with the names below; `parallelism/rules.py`
maps them to mesh axes. A model receives a `Constrain` callable from the composition
root, so it can pin activations at block boundaries without knowing any mesh.
"""

from typing import Callable, Sequence

import jax

# Activations.
BATCH = 'batch'
LENGTH = 'length'
ACT_EMBED = 'act_embed'
ACT_HEADS = 'act_heads'
ACT_MLP = 'act_mlp'
# Parameters.
EMBED = 'embed'
HEADS = 'heads'
KV_HEADS = 'kv_heads'
MLP = 'mlp'
VOCAB = 'vocab'
LAYERS = 'layers'

Axes = Sequence[str | None]
Constrain = Callable[[jax.Array, Axes], jax.Array]


def unconstrained(x: jax.Array, axes: Axes) -> jax.Array:
  """The single-device default: a no-op."""
  del axes
  return x
