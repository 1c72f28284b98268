"""The seams a model receives from the composition root (`training/composition.py`): how to
attend, how to pin activations, how recurrent layers run their token-order ops, how K/V read
by several layers travel, whether projections flatten tokens, and how a layer's stages are
scheduled. Models never see a mesh; they call these.

Per-batch plans (DistCA's task plan, `parallelism/disaggregation.py`) are not part of the
runtime: they are step inputs, passed down explicitly as the model call's `attn_plan`
argument, through the blocks, to the attend call (`self_attention_kwargs` adds it there).
"""

import dataclasses
from typing import Any, Protocol

import jax

from modeling import axes as ax
from modeling import shared_kv as shared_kv_lib
from modeling import ssm
from modeling.attention import AttendFn, self_attention_kwargs, xla_attention  # noqa: F401 - re-exported


class LayerStages(Protocol):
  """What a layer exposes to a schedule (`transformer.Block` does): the part before core
  attention, the part after it, and the pin of its output."""

  def pre(self, x_BLD: jax.Array, positions_BL: jax.Array) -> tuple[jax.Array, ...]:
    """(q, k, v): norm, projections and RoPE."""
    ...

  def post(self, x_BLD: jax.Array, o_BLHD: jax.Array) -> jax.Array:
    """Output projection, residual and MLP."""
    ...

  def pin(self, x_BLD: jax.Array) -> jax.Array:
    """The layer output's sharding constraint."""
    ...

  def forward(self, x_BLD, *, segment_ids, positions, kv=None, attn_plan=None):
    """The plain order: pre -> attend -> post (-> pin); returns (x, (k, v))."""
    ...


class LayerSchedule(Protocol):
  """How one layer's stages run: `schedule(layer, x, segment_ids=, positions=, kv=,
  attn_plan=) -> (x, (k, v))`. `kv` given (a layer attending with another layer's K/V) must
  be honoured."""

  def __call__(self, layer: LayerStages, x_BLD: jax.Array, *, segment_ids, positions,
               kv=None, attn_plan=None) -> tuple[jax.Array, Any]:
    ...


def sequential(layer: LayerStages, x_BLD, *, segment_ids, positions, kv=None, attn_plan=None):
  """The default layer schedule: pre -> attend -> post, one call after the other."""
  return layer.forward(x_BLD, segment_ids=segment_ids, positions=positions, kv=kv,
                       attn_plan=attn_plan)


@dataclasses.dataclass(frozen=True)
class Runtime:
  """What the composition root hands a model.

  attend          core attention (`modeling/attention.py` AttendFn)
  constrain       pins an activation to its logical axes (`modeling/axes.py`)
  recurrence      recurrent layers' token-order ops (None: the model's own single-device scan)
  shared_kv       K/V read by several layers (None: every reader calls `attend` on them)
  flatten_tokens  projections as 2-D [tokens, features] matmuls (`layers.dense`); off when the
                  sequence dimension is sharded (context parallelism)
  layer_schedule  how a layer's pre / attend / post stages run (`sequential`, or DistCA's
                  ping-pong over nano-batches, `parallelism/disaggregation_attend.PingPong`)
  """
  attend: AttendFn = xla_attention
  constrain: ax.Constrain = ax.unconstrained
  recurrence: ssm.Recurrence | None = None
  shared_kv: shared_kv_lib.SharedKV | None = None
  flatten_tokens: bool = True
  layer_schedule: LayerSchedule = sequential
