"""The pieces of CART's recurrence: the anchored K/V projection, the shared core block and the
glue between loop iterations (hyper-connections, loop-index embedding, LTI gate).

"CART: Context-Anchored Recurrent Transformer" (Capps, 2026). modeling/cart.py assembles them.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from modeling import axes as ax
from modeling import layers
from modeling.runtime import Runtime, self_attention_kwargs
from modeling.transformer import dtype_of

# Base of the sinusoidal loop-index code, as in the reference.
LOOP_CODE_BASE = 10_000.0


def loop_index_table(rows: int, dim: int) -> np.ndarray:
  """pe[r, 2i] = sin(r w_i), pe[r, 2i+1] = cos(r w_i), w_i = base^(-2i/dim): a constant
  [rows, dim] table (not a parameter), interleaved like the reference."""
  r = np.arange(rows, dtype=np.float64)[:, None]
  freq = np.exp(-np.arange(0, dim, 2, dtype=np.float64) * np.log(LOOP_CODE_BASE) / dim)
  pe = np.zeros((rows, dim), np.float64)
  pe[:, 0::2] = np.sin(r * freq)
  pe[:, 1::2] = np.cos(r * freq)
  return pe.astype(np.float32)


def kv_latent_dim(cfg: Any) -> int:
  return cfg.cart.kv_latent_dim or cfg.d_model // 4


class AnchorKV(nnx.Module):
  """K, V = (x W_down) W_k_up, (x W_down) W_v_up: an MLA-style low-rank bottleneck.

  Applied once to the anchor e (no RoPE: the core has no positions), or to the state every
  iteration under the `cart.recompute_kv` ablation.
  """

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs, runtime: Runtime):
    D, K, Dh, C = cfg.d_model, cfg.num_kv_heads, cfg.head_dim, kv_latent_dim(cfg)
    pdt, init = dtype_of(cfg.param_dtype), layers.normal(cfg.init_std)
    self.w_down = layers.param(rngs, init, (D, C), (ax.EMBED, None), pdt)
    self.w_k_up = layers.param(rngs, init, (C, K, Dh), (None, ax.KV_HEADS, None), pdt)
    self.w_v_up = layers.param(rngs, init, (C, K, Dh), (None, ax.KV_HEADS, None), pdt)
    self.dtype = dtype_of(cfg.dtype)
    self.constrain = runtime.constrain

  def __call__(self, x_BSD: jax.Array) -> tuple[jax.Array, jax.Array]:
    # K/V heads replicated where the head shards do not divide them (as the dense model's).
    dt, spec = self.dtype, (ax.BATCH, ax.LENGTH, ax.KV_HEADS, None)
    c_BSC = x_BSD.astype(dt) @ self.w_down[...].astype(dt)
    k_BSKD = jnp.einsum('bsc,ckd->bskd', c_BSC, self.w_k_up[...].astype(dt))
    v_BSKD = jnp.einsum('bsc,ckd->bskd', c_BSC, self.w_v_up[...].astype(dt))
    return self.constrain(k_BSKD, spec), self.constrain(v_BSKD, spec)


class CoreBlock(nnx.Module):
  """u = hh + W_o CausalAttn(Q = RMSNorm(hh) W_q, K, V);  f = u + SwiGLU(RMSNorm(u)).

  Cross-attention from the evolving state to the frozen anchor K/V, through the attention
  seam with the same tokens' segment ids and positions, so context parallelism applies. It
  must be causal: with a full mask, h[t] reads e[t+1] and the loss collapses (paper, Pitfalls).
  No RoPE on Q (nor on K).
  """

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs, runtime: Runtime):
    D, H, Dh = cfg.d_model, cfg.num_heads, cfg.head_dim
    pdt, init = dtype_of(cfg.param_dtype), layers.normal(cfg.init_std)
    self.attn_norm = layers.RMSNorm(D, eps=cfg.norm_eps, rngs=rngs, param_dtype=pdt)
    self.wq = layers.param(rngs, init, (D, H, Dh), (ax.EMBED, ax.HEADS, None), pdt)
    self.wo = layers.param(rngs, init, (H, Dh, D), (ax.HEADS, None, ax.EMBED), pdt)
    self.mlp_norm = layers.RMSNorm(D, eps=cfg.norm_eps, rngs=rngs, param_dtype=pdt)
    # Reference init: every Linear N(0, init_std), output projections included.
    self.mlp = layers.SwiGLU(D, cfg.mlp_dim, init_std=cfg.init_std, rngs=rngs,
                             constrain=runtime.constrain, dtype=dtype_of(cfg.dtype),
                             param_dtype=pdt, out_std=cfg.init_std)
    self.dtype = dtype_of(cfg.dtype)
    self.runtime = runtime

  def __call__(self, hh_BLD, k_BSKD, v_BSKD, *, segment_ids, positions, attn_plan=None):
    dt, c = self.dtype, self.runtime.constrain
    q_BLHD = jnp.einsum('bld,dhk->blhk', self.attn_norm(hh_BLD).astype(dt),
                        self.wq[...].astype(dt))
    q_BLHD = c(q_BLHD, (ax.BATCH, ax.LENGTH, ax.ACT_HEADS, None))
    o_BLHD = self.runtime.attend(q_BLHD, k_BSKD, v_BSKD, causal=True,
                                 **self_attention_kwargs(segment_ids, positions, attn_plan))
    o_BLHD = checkpoint_name(o_BLHD, 'attention_out')
    u_BLD = hh_BLD + jnp.einsum('blhk,hkd->bld', o_BLHD, self.wo[...].astype(dt))
    return u_BLD + self.mlp(self.mlp_norm(u_BLD))


def _one_hot_logits(key, shape, dtype):
  """Raw hyper-connection logits [1, 0, ..., 0]; softmax makes them (0.576, 0.212, 0.212) for
  three slots, not a pure residual: the reference's actual init, kept for parity."""
  del key
  return jnp.zeros(shape, dtype).at[0].set(1.0)


class LoopGlue(nnx.Module):
  """What happens between core applications; shared by every iteration (and by every block
  under the unshared-core ablation, as in the reference).

    hh = sum_i softmax(theta)_i buf[i] + W_lie pe[r]      (hyper-connections, loop index)
    h  = sigmoid(a) * hh + f                               (per-channel LTI gate)

  Each term can be switched off by config; a switched-off term owns no parameter.
  """

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
    c, D = cfg.cart, cfg.d_model
    pdt = dtype_of(cfg.param_dtype)
    self.hyper, self.gated, self.indexed = c.hyper_connections, c.lti_gate, c.loop_embedding
    self.slots = c.hyper_slots if c.hyper_connections else 1
    if self.hyper:
      self.theta = layers.param(rngs, _one_hot_logits, (self.slots,), (None,), pdt)
    if self.gated:
      logit = float(np.log(c.lti_init / (1.0 - c.lti_init)))
      self.a = layers.param(rngs, nnx.initializers.constant(logit), (D,), (ax.EMBED,), pdt)
    if self.indexed:
      self.w_lie = layers.param(rngs, layers.normal(cfg.init_std), (c.loop_embed_dim, D),
                                (None, ax.EMBED), pdt)
    self.dtype = dtype_of(cfg.dtype)

  def hyper_weights(self) -> jax.Array:
    return jax.nn.softmax(self.theta[...].astype(jnp.float32))

  def spectral_radius(self) -> jax.Array:
    """rho = max_i sigmoid(a_i): the radius of the diagonal gate only. The block keeps its
    own residual, so the full carry is (1 + sigmoid(a)) hh + delta (paper, Pitfalls)."""
    return jnp.max(jax.nn.sigmoid(self.a[...].astype(jnp.float32)))

  def blend(self, buf: tuple[jax.Array, ...], pe_C: jax.Array | None) -> jax.Array:
    """hh from the newest-first buffer of states and this iteration's loop-index code."""
    if self.hyper:
      w = self.hyper_weights().astype(self.dtype)
      hh_BLD = sum(w[i] * buf[i] for i in range(self.slots))
    else:
      hh_BLD = buf[0]
    if self.indexed:
      hh_BLD = hh_BLD + (pe_C.astype(self.dtype) @ self.w_lie[...].astype(self.dtype))
    return hh_BLD

  def gate(self, hh_BLD: jax.Array, f_BLD: jax.Array) -> jax.Array:
    if not self.gated:
      return f_BLD
    return jax.nn.sigmoid(self.a[...]).astype(self.dtype) * hh_BLD + f_BLD
