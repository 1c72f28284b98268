"""The zigzag data layout: causal load balance for context parallelism, applied once, on the host.

Zigzag (zhuzilin/ring-flash-attention; Brandon et al., "Striped Attention", 2023, for the
striped cousin): cut each row into 2N chunks and give context device i the chunks
i and 2N-1-i, so every device holds one early and one late chunk and does the same causal
work. The permutation is applied to every per-token array of the host batch (inputs,
targets, segment ids, positions) before it becomes a global array. Attention masks by
positions, and the loss is a sum over tokens, so the model needs no change and nothing is
re-permuted per layer.
"""

from collections.abc import Callable

import ml_collections
import numpy as np
from jax.sharding import Mesh

from modeling import axes as ax
from parallelism import rules as rules_lib


def zigzag_order(seq_len: int, n: int) -> np.ndarray:
  """Index array: position t of the zigzag row holds token order[t] of the original row."""
  if seq_len % (2 * n):
    raise ValueError(f'seq_len={seq_len} is not divisible by 2 x context size {n} = {2 * n} '
                     '(needed by parallelism.zigzag=True)')
  chunks = np.arange(seq_len).reshape(2 * n, seq_len // (2 * n))
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * n - 1 - i]]) for i in range(n)])


def to_zigzag(x: np.ndarray, n: int, axis: int = 1) -> np.ndarray:
  return np.take(x, zigzag_order(x.shape[axis], n), axis=axis)


def from_zigzag(x, n: int, axis: int = 1):
  """The inverse of `to_zigzag` (works on numpy and jax arrays)."""
  return x.take(np.argsort(zigzag_order(x.shape[axis], n)), axis=axis)


def context_size(mesh: Mesh, rules) -> int:
  """How many devices split the sequence: the mesh axes the 'length' rule names."""
  spec = rules_lib.logical_to_spec((ax.LENGTH,), rules, mesh)
  return rules_lib.mesh_axes_size(mesh, spec[0])


def uses_zigzag(config: ml_collections.ConfigDict, mesh: Mesh) -> bool:
  p = config.parallelism
  return p.context_impl != 'none' and p.zigzag and context_size(mesh, p.rules) > 1


def host_layout(config: ml_collections.ConfigDict,
                mesh: Mesh) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
  """The per-batch host transform for this run: zigzag when context parallel, else identity."""
  if not uses_zigzag(config, mesh):
    return lambda batch: batch
  n = context_size(mesh, config.parallelism.rules)
  zigzag_order(config.seq_len, n)  # fail at start-up, not at the first batch
  return lambda batch: {k: to_zigzag(np.asarray(v), n) for k, v in batch.items()}
