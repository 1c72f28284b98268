"""Context-parallel Mamba: the selective scan and causal conv of a sequence split over devices.

The recurrence h_t = a_t h_{t-1} + b_t is linear, so a piece of tokens scanned from a zero
state gives h_t = h_local_t + (a_s ... a_t) h_in, where h_in is the true state entering the
piece. Per device (`ssm.Recurrence` for `Runtime.recurrence`):

  1. Scan each local piece from zero with the single-device scan (chunked, as on one device).
  2. Summarise each piece by the map h_in -> h_out = (product of its decays) h_in + (final
     local state). The product is exp(A * sum dt), zero if a segment starts inside, and A is
     the same everywhere, so the summary is sum dt [B, E], a flag, and the state [B, E, N].
  3. All-gather the summaries over the context axis (tiny next to the [B, L/N, E] scan
     inputs, which never move) and compose them in token order (zigzag: over all 2N chunks),
     giving every piece its h_in.
  4. Correct the outputs: y_t += C_t . (exp(A * cumsum(dt)_t) * h_in), zero from the first
     segment start on, evaluated chunk by chunk (rematerialised) so no [B, L, E, N] tensor is
     ever held.

Segment starts are found with the predecessor token's segment id, and the conv reads the
predecessor chunk's last d_conv-1 inputs, both fetched by one `ppermute` per piece
(`halo.py`). Gradients are JAX's autodiff of all this (the all-gather's transpose is a
reduce-scatter of the tiny summary gradients); memory stays O(L/N) per device.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from modeling import axes as ax
from modeling import ssm
from parallelism import rules as rules_lib
from parallelism.context import halo
from parallelism.context.sharded import ContextAxis


def _flat(x):
  """[k, B, ...] -> [k*B, ...]: pieces scan as independent rows."""
  return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _segment_starts(seg_kBL, prev_kB):
  prev = jnp.concatenate([prev_kB[..., None], seg_kBL[..., :-1]], axis=-1)
  return seg_kBL != prev


def _correction(cs_BLE, open_BL, C_BLN, A_EN, h_in_BEN, chunk: int):
  """C_t . (exp(A cs_t) h_in) where `open`, 0 elsewhere; [B, L, E], one chunk at a time."""
  Bsz, L, E = cs_BLE.shape
  T = min(chunk, L)
  pad = -L % T
  if pad:
    cs_BLE, open_BL, C_BLN = (jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
                              for v in (cs_BLE, open_BL, C_BLN))
  n = (L + pad) // T
  chunks = lambda v: jnp.swapaxes(v.reshape(Bsz, n, T, *v.shape[2:]), 0, 1)

  @jax.checkpoint
  def one(args):
    cs, op, c = args
    decay_BTEN = jnp.exp(cs[..., None] * A_EN) * op[..., None, None]
    return jnp.einsum('bten,ben,btn->bte', decay_BTEN, h_in_BEN, c)

  y_nBTE = jax.lax.map(one, (chunks(cs_BLE), chunks(open_BL), chunks(C_BLN)))
  return jnp.swapaxes(y_nBTE, 0, 1).reshape(Bsz, n * T, E)[:, :L]


def local_scan(x, dt, A_EN, B_, C_, seg, *, axis: ContextAxis, zigzag: bool,
               scan_fn: ssm.ScanFn, chunk: int):
  """One device's part of the split scan: (y [B, L_local, E], the sequence's last state)."""
  k, n = halo.num_pieces(zigzag), axis.size
  xs, dts, Bs, Cs, ss = (halo.split(v, k) for v in (x, dt, B_, C_, seg))
  _, Bsz, Lp = ss.shape
  prev, has = halo.from_predecessor(axis, zigzag, ss[:, :, -1])
  starts = _segment_starts(ss, jnp.where(has[:, None], prev, -1))    # [k, B, Lp]
  y0, h_local = scan_fn(_flat(xs), _flat(dts), A_EN, _flat(Bs), _flat(Cs),
                        reset_BL=_flat(starts))
  A_EN = A_EN.astype(jnp.float32)
  cs_BLE = jnp.cumsum(_flat(dts).astype(jnp.float32), axis=1)
  open_BL = jnp.cumsum(_flat(starts).astype(jnp.int32), axis=1) == 0   # no start yet
  # The piece's decay product is exp(A * sum dt) (0 if a segment starts inside), and A is the
  # same on every device: send sum dt [B, E] and the open flag, not the [B, E, N] product.
  decay_meta = jnp.concatenate([cs_BLE[:, -1], open_BL[:, -1:].astype(jnp.float32)], axis=-1)
  meta, h_every = (axis.all_gather(v.reshape(k, Bsz, *v.shape[1:])[None], axis=0)
                   for v in (decay_meta, h_local))      # [n, k, B, E+1], [n, k, B, E, N]
  E = A_EN.shape[0]
  h = jnp.zeros_like(h_local[:Bsz])
  h_in = []
  for d, p in halo.token_order(n, zigzag):   # compose in token order (2N tiny steps)
    h_in.append(h)
    decay = jnp.exp(meta[d, p, :, :E, None] * A_EN) * meta[d, p, :, E, None, None]
    h = decay * h + h_every[d, p]
  mine = jnp.stack(h_in)[halo.chunk_index(axis, zigzag)]              # [k, B, E, N]
  y = y0 + _correction(cs_BLE, open_BL, _flat(Cs), A_EN, _flat(mine), chunk)
  return halo.join(y.reshape(k, Bsz, Lp, -1)), h


def local_conv(x, w_WE, b_E, seg, *, axis: ContextAxis, zigzag: bool):
  """One device's part of the split causal conv: each piece reads its predecessor's halo."""
  W = w_WE.shape[0]
  if W == 1:
    return ssm.causal_conv(x, w_WE, b_E, seg)
  k = halo.num_pieces(zigzag)
  xs, ss = halo.split(x, k), halo.split(seg, k)
  Lp = ss.shape[2]
  if Lp < W - 1:
    raise ValueError(f'model.sambay.d_conv={W} needs at least {W - 1} tokens per context '
                     f'chunk; each device holds {k} chunk(s) of {Lp}: lower mesh.context or '
                     'raise seq_len')
  (hx, hs), has = halo.from_predecessor(axis, zigzag, (xs[:, :, Lp - W + 1:],
                                                       ss[:, :, Lp - W + 1:]))
  hs = jnp.where(has[:, None, None], hs, -1)   # no predecessor: taps read nothing
  out = [ssm.causal_conv(jnp.concatenate([hx[p], xs[p]], 1), w_WE, b_E,
                         jnp.concatenate([hs[p], ss[p]], 1))[:, W - 1:] for p in range(k)]
  return halo.join(jnp.stack(out))


def _hashable(rules):
  return tuple((name, tuple(a) if isinstance(a, list) else a) for name, a in rules)


@dataclasses.dataclass(frozen=True)
class ContextRecurrence:
  """`ssm.Recurrence` over the mesh's context axes: batch and channels as the rules say."""
  mesh: Mesh
  rules: tuple
  scan_fn: ssm.ScanFn
  zigzag: bool
  chunk: int

  def __post_init__(self):
    object.__setattr__(self, 'rules', _hashable(self.rules))

  def _specs(self):
    x = rules_lib.logical_to_spec((ax.BATCH, ax.LENGTH, ax.ACT_MLP), self.rules, self.mesh)
    names = () if x[1] is None else ((x[1],) if isinstance(x[1], str) else tuple(x[1]))
    axis = ContextAxis(names, rules_lib.mesh_axes_size(self.mesh, x[1]))
    return x, P(x[0], x[1], None), P(x[0], x[1]), axis

  def conv(self, x_BLE, w_WE, b_E, segment_ids_BL):
    x_spec, _, seg_spec, axis = self._specs()
    rules_lib.check_divisible(x_BLE.shape, x_spec, self.mesh, 'mamba conv inputs')
    body = lambda x, w, b, s: local_conv(x, w, b, s, axis=axis, zigzag=self.zigzag)
    return jax.shard_map(body, mesh=self.mesh,
                         in_specs=(x_spec, P(None, x_spec[2]), P(x_spec[2]), seg_spec),
                         out_specs=x_spec, check_vma=False)(x_BLE, w_WE, b_E, segment_ids_BL)

  def scan(self, x_BLE, dt_BLE, A_EN, B_BLN, C_BLN, *, segment_ids_BL):
    x_spec, n_spec, seg_spec, axis = self._specs()
    rules_lib.check_divisible(x_BLE.shape, x_spec, self.mesh, 'mamba scan inputs')

    def body(x, dt, A, b, c, s):
      return local_scan(x, dt, A, b, c, s, axis=axis, zigzag=self.zigzag,
                        scan_fn=self.scan_fn, chunk=self.chunk)

    # check_vma=False: the pieces branch on the device index and use partial permutations
    # (as the context attention bodies do, `sharded.py`).
    return jax.shard_map(body, mesh=self.mesh,
                         in_specs=(x_spec, x_spec, P(x_spec[2], None), n_spec, n_spec, seg_spec),
                         out_specs=(x_spec, P(x_spec[0], x_spec[2], None)), check_vma=False)(
        x_BLE, dt_BLE, A_EN, B_BLN, C_BLN, segment_ids_BL)
