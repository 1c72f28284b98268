"""Building blocks shared by every model family: parameters with logical axes, RMSNorm,
rotary embeddings, the SwiGLU MLP and the token embedding."""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from modeling import axes as ax
from modeling import rope as rope_lib


def dense(x: jax.Array, w: jax.Array, n_in: int = 1, flatten_tokens: bool = True) -> jax.Array:
  """Contracts x's last `n_in` dims with w's first `n_in`: [..., *in] x [*in, *out] -> [..., *out].

  With `flatten_tokens` it runs as one 2-D matmul [tokens, in] @ [in, out]. XLA:CPU lowers the
  backward weight gradient of a 3-D einsum (contracting batch and length together) with a
  transposed copy of the [tokens, out] gradient; the 2-D form needs none, which measured ~30%
  less CPU time for a SwiGLU MLP's forward + backward (docs/performance.md). Same arithmetic,
  same results. Leave it off when the token dimensions are sharded over more than one mesh
  axis (context parallelism): merging them would not keep each device's tokens contiguous.
  """
  in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
  assert x.shape[x.ndim - n_in:] == in_shape, (x.shape, w.shape)
  lead = x.shape[:x.ndim - n_in]
  if not flatten_tokens:
    letters = 'abcdefghijklmnopqrstuvwxyz'
    xs = letters[:x.ndim]
    ws = xs[x.ndim - n_in:] + letters[x.ndim:x.ndim + len(out_shape)]
    return jnp.einsum(f'{xs},{ws}->{xs[:x.ndim - n_in]}{ws[n_in:]}', x, w)
  k = math.prod(in_shape)
  y = x.reshape(-1, k) @ w.reshape(k, -1)
  return y.reshape(*lead, *out_shape)


def param(rngs: nnx.Rngs, init, shape, logical_axes: ax.Axes, dtype=jnp.float32) -> nnx.Param:
  """A parameter annotated with logical axes; sharding is applied later, by the rules."""
  assert len(shape) == len(logical_axes), (shape, logical_axes)
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(logical_axes),
                   eager_sharding=False)


def normal(std: float):
  return nnx.initializers.normal(std)


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale, computed in float32 (Zhang & Sennrich, 2019)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = param(rngs, nnx.initializers.ones, (dim,), (ax.EMBED,), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rotary(x_BLHD: jax.Array, positions_BL: jax.Array, rope: 'rope_lib.Rope | float') -> jax.Array:
  """Rotary position embedding (Su et al., 2021), half-split convention.

  Rotation angles come from each token's position within its own document, so packed
  documents each start at position 0. `rope` is a `modeling.rope.Rope` (base frequency plus
  any RoPE scaling, whose attention factor multiplies cos and sin) or a bare base `theta`.
  """
  if not isinstance(rope, rope_lib.Rope):
    rope = rope_lib.Rope(theta=float(rope))
  d = x_BLHD.shape[-1]
  inv_freq = jnp.asarray(rope.inv_freq(d))
  angle_BLF = positions_BL.astype(jnp.float32)[..., None] * inv_freq
  sin, cos = jnp.sin(angle_BLF)[:, :, None, :], jnp.cos(angle_BLF)[:, :, None, :]
  if (scale := rope.scale()) != 1.0:
    sin, cos = sin * scale, cos * scale
  x1, x2 = jnp.split(x_BLHD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHD.dtype)


class SwiGLU(nnx.Module):
  """MLP(x) = (SiLU(x W_gate) * (x W_up)) W_down (Shazeer, 2020)."""

  def __init__(self, d_model: int, mlp_dim: int, *, init_std: float, rngs: nnx.Rngs,
               constrain: ax.Constrain = ax.unconstrained, dtype=jnp.float32,
               param_dtype=jnp.float32, out_std: float | None = None,
               flatten_tokens: bool = False):
    self.flatten_tokens = flatten_tokens  # see `dense`
    self.w_gate = param(rngs, normal(init_std), (d_model, mlp_dim), (ax.EMBED, ax.MLP), param_dtype)
    self.w_up = param(rngs, normal(init_std), (d_model, mlp_dim), (ax.EMBED, ax.MLP), param_dtype)
    self.w_down = param(rngs, normal(out_std or init_std), (mlp_dim, d_model), (ax.MLP, ax.EMBED),
                        param_dtype)
    self.constrain = constrain
    self.dtype = dtype

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    x_BLD = x_BLD.astype(self.dtype)
    flat = self.flatten_tokens
    gate_BLF = dense(x_BLD, self.w_gate[...].astype(self.dtype), flatten_tokens=flat)
    up_BLF = dense(x_BLD, self.w_up[...].astype(self.dtype), flatten_tokens=flat)
    h_BLF = self.constrain(jax.nn.silu(gate_BLF) * up_BLF, (ax.BATCH, ax.LENGTH, ax.ACT_MLP))
    return dense(h_BLF, self.w_down[...].astype(self.dtype), flatten_tokens=flat)


class Embedding(nnx.Module):
  """Token embedding; `attend` reuses the table as a tied output head."""

  def __init__(self, vocab_size: int, d_model: int, *, init_std: float, rngs: nnx.Rngs,
               param_dtype=jnp.float32, constrain: ax.Constrain = ax.unconstrained):
    self.table = param(rngs, normal(init_std), (vocab_size, d_model), (ax.VOCAB, ax.EMBED),
                       param_dtype)
    self.constrain = constrain

  def __call__(self, tokens_BL: jax.Array, dtype) -> jax.Array:
    # Gather the whole table first (as FSDP does for every weight): a lookup into a table
    # sharded over vocab and embed makes the partitioner replicate activations instead.
    table_VD = self.constrain(self.table[...], (None, None))
    x_BLD = jnp.take(table_VD, tokens_BL, axis=0).astype(dtype)
    return self.constrain(x_BLD, (ax.BATCH, ax.LENGTH, ax.ACT_EMBED))

  def attend(self, x_BLD: jax.Array) -> jax.Array:
    return x_BLD @ self.table[...].astype(x_BLD.dtype).T
