"""Mapping a checkpoint's arrays onto a target model's arrays: copy, cast, and convert the layer
layout between one scanned stack ('blocks/attn/wq' with a leading 'layers' axis) and one entry
per layer ('blocks/0/attn/wq', 'blocks/1/attn/wq', ...). The same rule covers parameters and the
optimizer moments stored beside them ('opt_state/1/0/mu/blocks/...').

The plan is built from metadata only, so every mismatch is found (and named) before a byte of
array data is read: nothing is ever partly loaded.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp

from checkpoint.errors import UserError
from checkpoint.metadata import LAYERS, SEP, ArrayInfo


class CheckpointMismatch(UserError):
  """The checkpoint does not fit the target model (names the parameter)."""


@dataclasses.dataclass(frozen=True)
class Source:
  kind: str               # copy | stack (per-layer -> scanned) | index (scanned -> one layer)
  paths: tuple[str, ...]  # checkpoint arrays read
  index: int = 0          # 'index': which layer of the stack


def _stacked_sources(path: str, src: dict[str, ArrayInfo], depth: int) -> list[str] | None:
  """'a/blocks/w' -> ['a/blocks/0/w', 'a/blocks/1/w', ...] if the checkpoint has them."""
  parts = path.split(SEP)
  for k in range(1, len(parts)):
    def cand(i, k=k):
      return SEP.join(parts[:k] + [str(i)] + parts[k:])
    if cand(0) in src:
      found = [cand(i) for i in range(depth)]
      missing = [p for p in found if p not in src]
      if missing:
        raise CheckpointMismatch(f'{path}: the model stacks {depth} layers but the checkpoint '
                                 f'lacks {missing[0]} (different model.num_layers?)')
      if cand(depth) in src:
        raise CheckpointMismatch(f'{path}: the model stacks {depth} layers but the checkpoint '
                                 f'also holds {cand(depth)} (different model.num_layers?)')
      return found
  return None


def _layer_of(path: str, src: dict[str, ArrayInfo]) -> tuple[str, int] | None:
  """'a/blocks/3/w' -> ('a/blocks/w', 3) if the checkpoint holds that scanned stack."""
  parts = path.split(SEP)
  for k, part in enumerate(parts):
    if part.isdigit():
      stacked = SEP.join(parts[:k] + parts[k + 1:])
      info = src.get(stacked)
      if info is not None and info.axes[:1] == (LAYERS,):
        return stacked, int(part)
  return None


def plan(src: dict[str, ArrayInfo], dst: dict[str, ArrayInfo]) -> dict[str, Source]:
  """How each target array is made from checkpoint arrays; raises CheckpointMismatch naming the
  first array that cannot be made, or a checkpoint array the target has no place for."""
  out: dict[str, Source] = {}
  for path, want in dst.items():
    have = src.get(path)
    if have is not None:
      if have.shape != want.shape:
        raise CheckpointMismatch(f'{path}: checkpoint shape {have.shape}, model shape '
                                 f'{want.shape} (a checkpoint of a different model config?)')
      out[path] = Source('copy', (path,))
      continue
    if want.axes[:1] == (LAYERS,):
      parts = _stacked_sources(path, src, want.shape[0])
      if parts is not None:
        for p in parts:
          if src[p].shape != want.shape[1:]:
            raise CheckpointMismatch(f'{path}: checkpoint layer {p} has shape {src[p].shape}, '
                                     f'the model expects {want.shape[1:]} per layer')
        out[path] = Source('stack', tuple(parts))
        continue
    layer = _layer_of(path, src)
    if layer is not None:
      stacked, i = layer
      if i >= src[stacked].shape[0] or src[stacked].shape[1:] != want.shape:
        raise CheckpointMismatch(f'{path}: checkpoint stack {stacked} has shape '
                                 f'{src[stacked].shape}, the model expects layer {i} of shape '
                                 f'{want.shape}')
      out[path] = Source('index', (stacked,), i)
      continue
    raise CheckpointMismatch(f'{path}: the model has this array (shape {want.shape}) but the '
                             'checkpoint does not (a checkpoint of a different model config?)')
  used = {p for s in out.values() for p in s.paths}
  for path in src:
    if path not in used:
      raise CheckpointMismatch(f'{path}: the checkpoint holds this array (shape '
                               f'{src[path].shape}) but the model has none like it (a checkpoint '
                               'of a different model config?)')
  for s in out.values():
    if s.kind == 'index':
      n = src[s.paths[0]].shape[0]
      got = sum(1 for t in out.values() if t.kind == 'index' and t.paths == s.paths)
      if got != n:
        raise CheckpointMismatch(f'{s.paths[0]}: the checkpoint stacks {n} layers but the model '
                                 f'has {got} (different model.num_layers?)')
  return out


def is_identity(p: dict[str, Source], src: dict[str, ArrayInfo],
                dst: dict[str, ArrayInfo]) -> bool:
  return all(s.kind == 'copy' and src[s.paths[0]].dtype == dst[path].dtype
             for path, s in p.items())


def apply(p: dict[str, Source], arrays: dict[str, Any], dst: dict[str, ArrayInfo]) -> dict:
  """Target arrays from checkpoint arrays (traceable: run it under jit with target shardings)."""
  out = {}
  for path, s in p.items():
    if s.kind == 'copy':
      x = arrays[s.paths[0]]
    elif s.kind == 'stack':
      x = jnp.stack([arrays[q] for q in s.paths])
    else:
      x = arrays[s.paths[0]][s.index]
    out[path] = x.astype(dst[path].dtype)
  return out
