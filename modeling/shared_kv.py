"""The seam for K/V that several layers read (SambaY's cross-decoder reads the one full-attention
layer's K/V in every cross-attention layer).

`SharedKV.gather` runs once per forward pass on the source layer's K/V; `SharedKV.attend` is
the `AttendFn` every reader then calls on what `gather` returned. On one device gather is the
identity and attend is the runtime's attention; under context parallelism
(`parallelism/context/shared_kv.py`) gather all-gathers the K/V over the context axis once, so
each reader attends locally instead of running its own ring over the same K/V.
"""

import dataclasses
from typing import Protocol

import jax

from modeling.attention import AttendFn


class SharedKV(Protocol):
  attend: AttendFn

  def gather(self, k_BSKD: jax.Array, v_BSKD: jax.Array, segment_ids_BS: jax.Array,
             positions_BS: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(k, v, kv segment ids, kv positions) in the form `attend` takes as keys."""
    ...


@dataclasses.dataclass(frozen=True)
class Unshared:
  """Every reader attends to the K/V as they are, through `attend`."""
  attend: AttendFn

  def gather(self, k_BSKD, v_BSKD, segment_ids_BS, positions_BS):
    return k_BSKD, v_BSKD, segment_ids_BS, positions_BS
