"""Rotary frequencies with RoPE scaling for context extension: `linear` (Position
Interpolation, Chen et al., 2023), `ntk` (NTK-aware base change, bloc97, 2023), `yarn` (YaRN:
Efficient Context Window Extension of Large Language Models, Peng et al., 2023), `llama3` (The
Llama 3 Herd of Models, 2024) and `longrope` (LongRoPE, Ding et al., 2024).

Each method changes the inverse frequencies `inv_freq[i] = theta^(-2i/d)` and may scale cos and
sin by an attention factor (so q.k by its square). The formulas follow Hugging Face transformers'
`modeling_rope_utils` of the same names, so imported checkpoints compute the same function.
Frequencies are computed once per (config, head dim) on the host in float64 and rounded to
float32; `layers.rotary` multiplies them by positions.

Choices where the references differ or depend on the sequence:
  * `ntk` is the static NTK-aware rule `theta' = theta * factor^(d/(d-2))`. HF's `dynamic`
    variant changes the frequencies with the current sequence length, so a decode cache written
    at one length would hold keys rotated with other frequencies; it is not offered.
  * `longrope` applies `long_factor` at every position (the extended model). HF switches to
    `short_factor` for sequences no longer than `original_max_position_embeddings`, which
    likewise makes the frequencies depend on the sequence length.
"""

import dataclasses
import functools
import math
from typing import Any

import numpy as np

TYPES = ('none', 'linear', 'ntk', 'yarn', 'llama3', 'longrope')


@dataclasses.dataclass(frozen=True)
class Rope:
  """Everything rotary needs: base, scaling type and its parameters (hashable, static)."""
  theta: float
  type: str = 'none'
  factor: float = 1.0
  original_max_position_embeddings: int = 0   # L0, the length the model was trained at
  low_freq_factor: float = 1.0                # llama3
  high_freq_factor: float = 4.0               # llama3
  beta_fast: float = 32.0                     # yarn
  beta_slow: float = 1.0                      # yarn
  truncate: bool = True                       # yarn: floor/ceil the correction range
  attention_factor: float = 0.0               # yarn, longrope; 0 = the paper's default
  long_factor: tuple[float, ...] = ()         # longrope: one rescale factor per frequency

  def inv_freq(self, dim: int) -> np.ndarray:
    """[dim/2] float32 inverse frequencies for a rotary width of `dim`."""
    return _inv_freq(self, dim)

  def scale(self) -> float:
    """The attention factor cos and sin are multiplied by (1.0 for most types)."""
    if self.attention_factor:
      return float(self.attention_factor)
    if self.type == 'yarn':
      return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0
    if self.type == 'longrope':
      L0 = self.original_max_position_embeddings
      return math.sqrt(1 + math.log(self.factor) / math.log(L0)) if self.factor > 1 else 1.0
    return 1.0


@functools.lru_cache(maxsize=64)
def _inv_freq(rope: Rope, dim: int) -> np.ndarray:
  base, s, L0 = rope.theta, rope.factor, rope.original_max_position_embeddings
  if rope.type == 'ntk':
    base = base * s ** (dim / (dim - 2))
  exponent = np.arange(0, dim, 2, dtype=np.float64) / dim
  inv = 1.0 / base ** exponent
  if rope.type == 'linear':
    inv = inv / s
  elif rope.type == 'yarn':
    def corr_dim(rotations):
      return dim * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low, high = corr_dim(rope.beta_fast), corr_dim(rope.beta_slow)
    if rope.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
      high += 0.001   # as the reference: avoid dividing by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp
    inv = inv / s * (1 - extrapolate) + inv * extrapolate
  elif rope.type == 'llama3':
    low_wl = L0 / rope.low_freq_factor
    high_wl = L0 / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (L0 / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    mid = (1 - smooth) * inv / s + smooth * inv
    inv = np.where(wavelen > low_wl, inv / s, np.where(wavelen < high_wl, inv, mid))
  elif rope.type == 'longrope':
    inv = inv / np.asarray(rope.long_factor, np.float64)
  out = inv.astype(np.float32)
  out.setflags(write=False)
  return out


def _error(key: str, value: Any, why: str) -> ValueError:
  return ValueError(f'model.rope_scaling.{key}={value!r}: {why}')


def from_model(cfg: Any, theta: float | None = None) -> Rope | None:
  """The `Rope` of a model config (its `rope_theta` and `rope_scaling`); None for NoPE.

  Raises a one-line ValueError naming the `model.rope_scaling.*` key for invalid settings.
  """
  theta = float(cfg.rope_theta if theta is None else theta)
  if not theta:
    return None
  sc = cfg.get('rope_scaling') if hasattr(cfg, 'get') else getattr(cfg, 'rope_scaling', None)
  if sc is None or sc.get('type', 'none') in ('none', '', None):
    return Rope(theta=theta)
  out = make(theta, dict(sc))
  check_dim(out, int(cfg.head_dim))
  return out


def make(theta: float, sc: dict[str, Any]) -> Rope:
  """A validated `Rope` from a `model.rope_scaling` mapping."""
  kind = sc.get('type', 'none')
  if kind not in TYPES:
    raise _error('type', kind, f'valid: {", ".join(TYPES)}')
  if kind == 'none':
    return Rope(theta=theta)
  factor = float(sc.get('factor', 1.0))
  if not factor >= 1.0:
    raise _error('factor', factor, 'must be >= 1 (the context growth ratio)')
  L0 = int(sc.get('original_max_position_embeddings', 0) or 0)
  if kind in ('yarn', 'llama3', 'longrope') and L0 <= 0:
    raise _error('original_max_position_embeddings', L0,
                 f'type {kind} needs the length the model was trained at (> 0)')
  low, high = float(sc.get('low_freq_factor', 1.0)), float(sc.get('high_freq_factor', 4.0))
  if kind == 'llama3' and not 0 < low < high:
    raise _error('high_freq_factor', high, f'llama3 needs 0 < low_freq_factor ({low}) < '
                 'high_freq_factor')
  beta_fast, beta_slow = float(sc.get('beta_fast', 32.0)), float(sc.get('beta_slow', 1.0))
  if kind == 'yarn' and not 0 < beta_slow < beta_fast:
    raise _error('beta_fast', beta_fast, f'yarn needs 0 < beta_slow ({beta_slow}) < beta_fast')
  attention_factor = float(sc.get('attention_factor', 0.0) or 0.0)
  if attention_factor < 0:
    raise _error('attention_factor', attention_factor, 'must be > 0 (or 0 for the default)')
  long_factor = sc.get('long_factor', ()) or ()
  if isinstance(long_factor, str):
    try:
      long_factor = [float(v) for v in long_factor.split(',') if v.strip()]
    except ValueError:
      raise _error('long_factor', long_factor, 'comma-separated numbers expected') from None
  long_factor = tuple(float(v) for v in long_factor)
  if kind == 'longrope' and (not long_factor or min(long_factor) <= 0):
    raise _error('long_factor', sc.get('long_factor'), 'longrope needs one positive rescale '
                 'factor per rotary frequency (head_dim / 2 of them)')
  return Rope(theta=float(theta), type=kind, factor=factor,
              original_max_position_embeddings=L0, low_freq_factor=low, high_freq_factor=high,
              beta_fast=beta_fast, beta_slow=beta_slow,
              truncate=bool(sc.get('truncate', True)), attention_factor=attention_factor,
              long_factor=long_factor)


def check_dim(rope: Rope | None, dim: int) -> None:
  """Raises if the rope's per-frequency lists do not fit a rotary width of `dim`."""
  if rope is not None and rope.type == 'longrope' and len(rope.long_factor) != dim // 2:
    raise _error('long_factor', ','.join(map(str, rope.long_factor)),
                 f'needs {dim // 2} factors (head_dim / 2), got {len(rope.long_factor)}')
