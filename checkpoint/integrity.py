"""Checksums that tell a checkpoint's arrays and data states apart from corrupted copies.

Array checksums are computed on the devices from the global (logical) array, so they do not
depend on the mesh, the shardings or the process count: a checkpoint written on 8 devices is
verified on 1. Each array gives two 32-bit sums over its elements' bit patterns:
  h1 = sum_i bits_i * (2i + 1)            (odd weights: any single flipped bit changes h1)
  h2 = sum_i fmix32(bits_i ^ i * golden)  (a bijective mix per element, position-dependent)
with i the element's row-major index and all arithmetic modulo 2^32. The sums are order-free,
so XLA may reduce the shards in any order. This is an integrity check against disk and transfer
faults, not a cryptographic hash.

Data-state files are small JSON: their checksum is a SHA-256 of the bytes written. The step
metadata carries a SHA-256 of its own canonical JSON (meta_checksum). In a
multi-process run every process checksums its own file and process 0 (which writes the
metadata) gathers them.
"""

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_GOLDEN = np.uint32(0x9E3779B9)


def _words(x: jax.Array) -> jax.Array:
  """The bit pattern of every element as uint32 (same shape)."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return lax.bitcast_convert_type(x, jnp.uint32)
  if size == 2:
    return lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  if size == 1:
    return lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  raise TypeError(f'no checksum for dtype {x.dtype} (itemsize {size})')


def _index(shape: tuple[int, ...]) -> jax.Array:
  """Row-major element index (mod 2^32), built per shard from iotas: no reshapes of x."""
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for d in reversed(range(len(shape))):
    idx = idx + lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride % (1 << 32))
    stride *= shape[d]
  return idx


def _fmix(h: jax.Array) -> jax.Array:
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _sums(x: jax.Array) -> jax.Array:
  u = _words(x)
  i = _index(x.shape)
  h1 = jnp.sum(u * (i * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  h2 = jnp.sum(_fmix(u ^ (i * _GOLDEN)), dtype=jnp.uint32)
  return jnp.stack([h1, h2])


def _finite(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.all(jnp.isfinite(x))
  return jnp.array(True)


@jax.jit
def _all_sums(arrays: dict[str, jax.Array]) -> dict[str, tuple[jax.Array, jax.Array]]:
  return {p: (_sums(x), _finite(x)) for p, x in arrays.items()}


def checksums_and_finite(arrays: dict[str, Any]) -> tuple[dict[str, str], dict[str, bool]]:
  """({path: 16 hex digits}, {path: all values finite}) for every array, in one compiled
  program per set of shapes."""
  if not arrays:
    return {}, {}
  out = jax.device_get(_all_sums(dict(arrays)))
  return ({p: f'{int(s[0]):08x}{int(s[1]):08x}' for p, (s, _) in out.items()},
          {p: bool(f) for p, (_, f) in out.items()})


def array_checksums(arrays: dict[str, Any]) -> dict[str, str]:
  """{path: 16 hex digits} for every array."""
  return checksums_and_finite(arrays)[0]


def bytes_checksum(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()[:32]


def meta_checksum(meta: dict[str, Any]) -> str:
  """SHA-256 (32 hex digits) of the step metadata's canonical JSON, without its own
  'meta_checksum' field: an edited or corrupted metadata file is told apart."""
  plain = json.loads(json.dumps({k: v for k, v in meta.items() if k != 'meta_checksum'},
                                default=str))
  return bytes_checksum(json.dumps(plain, sort_keys=True, separators=(',', ':')).encode())


def gather_data_checksums(local: dict[str, str]) -> dict[str, str]:
  """Every process's {file name: checksum}, on every process. Each process of a training run
  writes exactly one data-state file; anything else keeps only the local entries."""
  if jax.process_count() == 1:
    return dict(local)
  from jax.experimental import multihost_utils  # multi-process only
  counts = multihost_utils.process_allgather(np.array([len(local)], np.int32))
  if not np.all(np.asarray(counts) == 1):
    return dict(local)
  (name, digest), = local.items()
  row = np.frombuffer(name.encode().ljust(64, b'\0')[:64] + bytes.fromhex(digest), np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(row)).reshape(-1, row.size)
  return {bytes(r[:64]).rstrip(b'\0').decode(): bytes(r[64:]).hex() for r in rows}
