"""Mamba-1 selective state-space layer with an exposed pre-gate scan output.

Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (2023), as used
by SambaY (Ren et al., "Decoder-Hybrid-Decoder Architecture for Efficient Reasoning with Long
Generation", 2025), whose Gated Memory Units read the scan output y *before* the SiLU(z) gate.

Per token t, channel e and state n (A = -exp(A_log) < 0, so exp(dt A) is a decay in (0, 1)):

    h_t = exp(dt_t A) * h_{t-1} + dt_t * B_t * x_t        y_t = C_t . h_t + D * x_t

with dt, B, C computed from the input (the "selective" part). `reset` zeroes the carried state
where a new packed document starts, so documents never see each other.

Two seams. `ScanFn(x, dt, A, B, C, *, reset, h0) -> (y, h_last)` picks a single-device scan.
`Recurrence` is everything in the layer that follows the *array order* of tokens (the causal
conv, segment starts found by adjacency, the scan): the runtime hands one in (`Runtime
.recurrence`), so a context-parallel version (`parallelism/context/scan.py`) replaces it when
the sequence is split across devices, without touching the layer.
"""

import dataclasses
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from modeling import axes as ax
from modeling import layers


class ScanFn(Protocol):

  def __call__(self, x_BLE: jax.Array, dt_BLE: jax.Array, A_EN: jax.Array, B_BLN: jax.Array,
               C_BLN: jax.Array, *, reset_BL: jax.Array,
               h0_BEN: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Returns (y without the D skip [B, L, E], last state [B, E, N]), both float32."""
    ...


def _discretise(x_BLE, dt_BLE, A_EN, B_BLN, reset_BL):
  """(decay, input) of the linear recurrence h_t = a_t * h_{t-1} + b_t, float32."""
  x_BLE, dt_BLE, B_BLN = (v.astype(jnp.float32) for v in (x_BLE, dt_BLE, B_BLN))
  a_BLEN = jnp.exp(dt_BLE[..., None] * A_EN.astype(jnp.float32))
  a_BLEN = jnp.where(reset_BL[:, :, None, None], 0.0, a_BLEN)   # forget the previous document
  b_BLEN = (dt_BLE * x_BLE)[..., None] * B_BLN[:, :, None, :]
  return a_BLEN, b_BLEN


def sequential_scan(x_BLE, dt_BLE, A_EN, B_BLN, C_BLN, *, reset_BL, h0_BEN=None):
  """The reference: one `lax.scan` step per token, materialising only one state at a time."""
  Bsz, _, E = x_BLE.shape
  N = A_EN.shape[1]
  h0 = jnp.zeros((Bsz, E, N), jnp.float32) if h0_BEN is None else h0_BEN.astype(jnp.float32)
  A_EN = A_EN.astype(jnp.float32)

  def step(h_BEN, inp):
    x_BE, dt_BE, b_BN, c_BN, r_B = inp
    a_BEN = jnp.where(r_B[:, None, None], 0.0, jnp.exp(dt_BE[..., None] * A_EN))
    h_BEN = a_BEN * h_BEN + (dt_BE * x_BE)[..., None] * b_BN[:, None, :]
    return h_BEN, jnp.einsum('ben,bn->be', h_BEN, c_BN)

  time_major = [jnp.swapaxes(v.astype(jnp.float32), 0, 1)
                for v in (x_BLE, dt_BLE, B_BLN, C_BLN)]
  h_last, y_LBE = jax.lax.scan(step, h0, (*time_major, jnp.swapaxes(reset_BL, 0, 1)))
  return jnp.swapaxes(y_LBE, 0, 1), h_last


def _combine(left, right):
  """Composes h -> a_l h + b_l then h -> a_r h + b_r (associative)."""
  a_l, b_l = left
  a_r, b_r = right
  return a_l * a_r, a_r * b_l + b_r


def associative_scan(x_BLE, dt_BLE, A_EN, B_BLN, C_BLN, *, reset_BL, h0_BEN=None):
  """Parallel prefix scan over the whole sequence (log-depth; holds [B, L, E, N] states)."""
  a_BLEN, b_BLEN = _discretise(x_BLE, dt_BLE, A_EN, B_BLN, reset_BL)
  if h0_BEN is not None:   # fold the carried-in state into the first input
    b_BLEN = b_BLEN.at[:, 0].add(a_BLEN[:, 0] * h0_BEN.astype(jnp.float32))
  _, h_BLEN = jax.lax.associative_scan(_combine, (a_BLEN, b_BLEN), axis=1)
  y_BLE = jnp.einsum('blen,bln->ble', h_BLEN, C_BLN.astype(jnp.float32))
  return y_BLE, h_BLEN[:, -1]


def make_chunked_scan(chunk: int) -> ScanFn:
  """Sequential over chunks of `chunk` tokens, parallel (associative) inside each chunk.

  Each chunk is rematerialised in the backward pass, so training keeps only the chunk-boundary
  states instead of all [B, L, E, N] states.
  """
  if chunk < 1:
    raise ValueError(f'model.sambay.scan_chunk={chunk} must be >= 1')

  def chunked_scan(x_BLE, dt_BLE, A_EN, B_BLN, C_BLN, *, reset_BL, h0_BEN=None):
    Bsz, L, E = x_BLE.shape
    N = A_EN.shape[1]
    T = min(chunk, L)
    pad = -L % T
    if pad:   # dt = 0 and no reset make a padded step the identity on the state
      x_BLE, dt_BLE, B_BLN, C_BLN, reset_BL = (
          jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
          for v in (x_BLE, dt_BLE, B_BLN, C_BLN, reset_BL))
    n = (L + pad) // T

    def chunks(v):   # [B, n*T, ...] -> [n, B, T, ...]
      return jnp.swapaxes(v.reshape(Bsz, n, T, *v.shape[2:]), 0, 1)

    @jax.checkpoint
    def body(h_BEN, inp):
      x, dt, b, c, r = inp
      y, h_BEN = associative_scan(x, dt, A_EN, b, c, reset_BL=r, h0_BEN=h_BEN)
      return h_BEN, y

    h0 = jnp.zeros((Bsz, E, N), jnp.float32) if h0_BEN is None else h0_BEN.astype(jnp.float32)
    h_last, y_nBTE = jax.lax.scan(body, h0, tuple(
        chunks(v) for v in (x_BLE, dt_BLE, B_BLN, C_BLN, reset_BL)))
    y_BLE = jnp.swapaxes(y_nBTE, 0, 1).reshape(Bsz, n * T, E)[:, :L]
    return y_BLE, h_last

  return chunked_scan


def make_scan(impl: str, chunk: int = 64) -> ScanFn:
  """`model.sambay.scan_impl` -> a single-device scan."""
  if impl == 'sequential':
    return sequential_scan
  if impl == 'associative':
    return associative_scan
  if impl == 'chunked':
    return make_chunked_scan(chunk)
  raise ValueError(f"model.sambay.scan_impl={impl!r}; valid: 'associative', 'chunked', "
                   "'sequential'")


def segment_starts(segment_ids_BL: jax.Array) -> jax.Array:
  """True where a token's segment differs from its predecessor's (and at t = 0)."""
  prev_BL = jnp.pad(segment_ids_BL, [(0, 0), (1, 0)], constant_values=-1)[:, :-1]
  return segment_ids_BL != prev_BL


def causal_conv(x_BLE, w_WE, b_E, segment_ids_BL):
  """Depthwise causal conv: out_t = b + sum_k w[W-1-k] x_{t-k}, taps only within the segment."""
  W, L = w_WE.shape[0], x_BLE.shape[1]
  out_BLE = x_BLE * w_WE[W - 1]
  for k in range(1, W):
    x_prev = jnp.pad(x_BLE, [(0, 0), (k, 0), (0, 0)])[:, :L]
    seg_prev = jnp.pad(segment_ids_BL, [(0, 0), (k, 0)], constant_values=-1)[:, :L]
    same_BL1 = (seg_prev == segment_ids_BL)[..., None]
    out_BLE = out_BLE + jnp.where(same_BL1, x_prev, 0.0) * w_WE[W - 1 - k]
  return out_BLE + b_E


class Recurrence(Protocol):
  """The order-dependent ops of a Mamba layer over one (possibly split) sequence."""

  def conv(self, x_BLE: jax.Array, w_WE: jax.Array, b_E: jax.Array,
           segment_ids_BL: jax.Array) -> jax.Array:
    """`causal_conv` over the whole sequence."""
    ...

  def scan(self, x_BLE: jax.Array, dt_BLE: jax.Array, A_EN: jax.Array, B_BLN: jax.Array,
           C_BLN: jax.Array, *, segment_ids_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The scan with a reset at every segment start: (y without D skip, last state)."""
    ...


@dataclasses.dataclass(frozen=True)
class LocalRecurrence:
  """The whole sequence in array order on one device (or as one global array under jit)."""
  scan_fn: ScanFn

  def conv(self, x_BLE, w_WE, b_E, segment_ids_BL):
    return causal_conv(x_BLE, w_WE, b_E, segment_ids_BL)

  def scan(self, x_BLE, dt_BLE, A_EN, B_BLN, C_BLN, *, segment_ids_BL):
    return self.scan_fn(x_BLE, dt_BLE, A_EN, B_BLN, C_BLN,
                        reset_BL=segment_starts(segment_ids_BL))


def _uniform(scale: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)
  return init


def _dt_bias_init(dt_min: float = 1e-3, dt_max: float = 0.1):
  """Bias so that softplus(bias) is log-uniform in [dt_min, dt_max] (Mamba's dt init)."""
  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), 1e-4)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)   # inverse softplus
  return init


def _a_log_init(key, shape, dtype=jnp.float32):
  """S4D-real: A_n = -(n + 1), the same for every channel."""
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)),
                          shape).astype(dtype)


def dims(cfg: Any) -> tuple[int, int, int, int]:
  """(d_inner E, d_state N, conv width W, dt rank R) from `model` and `model.sambay`."""
  s = cfg.sambay
  return (s.expand * cfg.d_model, s.d_state, s.d_conv,
          s.dt_rank or math.ceil(cfg.d_model / 16))


class Mamba(nnx.Module):
  """Mamba-1 mixer: in-proj -> causal conv -> SiLU -> selective scan -> * SiLU(z) -> out-proj.

  `__call__` returns (output, y) where y [B, L, E] is the scan readout (D skip included)
  before the SiLU(z) gate: the memory a GMU reads.
  """

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs, scan_fn: ScanFn | None = None,
               recurrence: Recurrence | None = None,
               constrain: ax.Constrain = ax.unconstrained, dtype=jnp.float32,
               param_dtype=jnp.float32):
    D = cfg.d_model
    E, N, W, R = dims(cfg)
    std, out_std = cfg.init_std, cfg.init_std / (2 * cfg.num_layers) ** 0.5
    p = lambda init, shape, names: layers.param(rngs, init, shape, names, param_dtype)
    self.w_x = p(layers.normal(std), (D, E), (ax.EMBED, ax.MLP))
    self.w_z = p(layers.normal(std), (D, E), (ax.EMBED, ax.MLP))
    self.conv_w = p(_uniform(W ** -0.5), (W, E), (None, ax.MLP))
    self.conv_b = p(nnx.initializers.zeros, (E,), (ax.MLP,))
    self.w_dt_low = p(layers.normal(std), (E, R), (ax.MLP, None))
    self.w_B = p(layers.normal(std), (E, N), (ax.MLP, None))
    self.w_C = p(layers.normal(std), (E, N), (ax.MLP, None))
    self.w_dt = p(_uniform(R ** -0.5), (R, E), (None, ax.MLP))
    self.dt_bias = p(_dt_bias_init(), (E,), (ax.MLP,))
    self.A_log = p(_a_log_init, (E, N), (ax.MLP, None))
    self.D = p(nnx.initializers.ones, (E,), (ax.MLP,))
    self.w_out = p(layers.normal(out_std), (E, D), (ax.MLP, ax.EMBED))
    if recurrence is None:
      recurrence = LocalRecurrence(scan_fn or make_scan(cfg.sambay.scan_impl,
                                                        cfg.sambay.scan_chunk))
    self.recurrence = recurrence
    self.constrain = constrain
    self.dtype = dtype

  def _w(self, name):
    return getattr(self, name)[...].astype(self.dtype)

  def _selective(self, xc_BLE):
    """dt [B, L, E] (softplus), B and C [B, L, N] from the convolved input."""
    dt_BLE = jax.nn.softplus((xc_BLE @ self._w('w_dt_low')) @ self._w('w_dt')
                             + self._w('dt_bias'))
    return dt_BLE, xc_BLE @ self._w('w_B'), xc_BLE @ self._w('w_C')

  def _gate_out(self, y_BLE, z_BLE):
    return (y_BLE * jax.nn.silu(z_BLE)) @ self._w('w_out')

  def mix(self, x_BLD, *, segment_ids):
    """(output, y, decode state) over a whole sequence; the state continues it token by token."""
    c = self.constrain
    x_BLD = x_BLD.astype(self.dtype)
    xi_BLE = c(x_BLD @ self._w('w_x'), (ax.BATCH, ax.LENGTH, ax.ACT_MLP))
    z_BLE = c(x_BLD @ self._w('w_z'), (ax.BATCH, ax.LENGTH, ax.ACT_MLP))
    rec = self.recurrence
    xc_BLE = jax.nn.silu(rec.conv(xi_BLE, self._w('conv_w'), self._w('conv_b'), segment_ids))
    dt_BLE, B_BLN, C_BLN = self._selective(xc_BLE)
    A_EN = -jnp.exp(self.A_log[...].astype(jnp.float32))
    y_BLE, h_BEN = rec.scan(xc_BLE, dt_BLE, A_EN, B_BLN, C_BLN, segment_ids_BL=segment_ids)
    y_BLE = c((y_BLE + xc_BLE * self._w('D')).astype(self.dtype),
              (ax.BATCH, ax.LENGTH, ax.ACT_MLP))
    W = self.conv_w.shape[0]
    # Decode state (prefill runs on one device, so these are the sequence's last inputs).
    conv_BWE = jnp.pad(xi_BLE, [(0, 0), (W - 1, 0), (0, 0)])[:, -(W - 1):]   # last W-1 inputs
    return self._gate_out(y_BLE, z_BLE), y_BLE, {'conv': conv_BWE, 'ssm': h_BEN}

  def __call__(self, x_BLD, *, segment_ids):
    out_BLD, y_BLE, _ = self.mix(x_BLD, segment_ids=segment_ids)
    return out_BLD, y_BLE

  def init_state(self, batch: int) -> dict[str, jax.Array]:
    W, E = self.conv_w.shape
    return {'conv': jnp.zeros((batch, W - 1, E), self.dtype),
            'ssm': jnp.zeros((batch, E, self.A_log.shape[1]), jnp.float32)}

  def step(self, x_B1D, state):
    """One decoding token: (output [B, 1, D], y [B, 1, E], new state)."""
    x_BD = x_B1D[:, 0].astype(self.dtype)
    xi_BE = x_BD @ self._w('w_x')
    z_BE = x_BD @ self._w('w_z')
    window_BWE = jnp.concatenate([state['conv'], xi_BE[:, None]], axis=1)
    xc_BE = jax.nn.silu(jnp.einsum('bwe,we->be', window_BWE, self._w('conv_w'))
                        + self._w('conv_b'))
    dt_BE, b_BN, c_BN = self._selective(xc_BE)
    A_EN = -jnp.exp(self.A_log[...].astype(jnp.float32))
    h_BEN = (jnp.exp(dt_BE[..., None] * A_EN) * state['ssm']
             + (dt_BE * xc_BE)[..., None] * b_BN[:, None, :])
    y_BE = (jnp.einsum('ben,bn->be', h_BEN, c_BN) + xc_BE * self._w('D')).astype(self.dtype)
    out_BD = self._gate_out(y_BE, z_BE)
    return out_BD[:, None], y_BE[:, None], {'conv': window_BWE[:, 1:], 'ssm': h_BEN}


def scan_flops_per_token(d_inner: int, d_state: int) -> float:
  """Scan FLOPs per token, our count: per (e, n) exp(dt A) 1 mul (+1 exp), dt x B 1 mul
  (dt x shared over n), a h + b 2, C . h 2 = 7; we use the common 9 x E x N estimate
  (docs/measuring.md), which also covers the exp and the reset select."""
  return 9.0 * d_inner * d_state


def mamba_forward_flops_per_token(cfg: Any) -> float:
  """Projections (2 x params), the depthwise conv (2 x W x E) and the scan."""
  D = cfg.d_model
  E, N, W, R = dims(cfg)
  matmul_params = 2 * D * E + E * (R + 2 * N) + R * E + E * D
  return 2.0 * matmul_params + 2.0 * W * E + scan_flops_per_token(E, N)

