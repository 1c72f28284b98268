"""Multi-head latent attention (MLA): K/V from one low-rank latent plus a decoupled RoPE key.

"DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model"
(DeepSeek-AI, 2024), section 2.1; used for CART's prelude and coda ("CART: Context-Anchored
Recurrent Transformer", Capps, 2026). Per token, with n_h heads, latent C and rotary width R:

    c   = RMSNorm(h W_DKV)                    [C]      cached
    k_R = RoPE(h W_KR)                        [R]      cached, ONE shared by all heads
    k_i = [c W_UK,i ; k_R]                    [Dh]     content part Dh - R, rotary part R
    v_i = c W_UV,i                            [Dh]
    q_i = [h W_UQ,i ; RoPE(h W_QR,i)]         [Dh]     (no query compression, as V2-Lite)
    o_i = softmax(q_i k_i^T / sqrt(Dh)) v_i;  u = W_O [o_1 .. o_n_h]

Choices (the papers leave them open; config keys in model.cart):
- The per-head query/key width stays `head_dim` (content Dh - R + rotary R) rather than
  DeepSeek-V2's Dh + R, so scores, values and the attention seam all keep one head width:
  every `attend` implementation (and every context-parallel strategy) runs MLA unchanged,
  with H key/value heads. R defaults to Dh / 2 = 32 at CART's Dh = 64 (paper note 8).
- Latent C = model.cart.kv_latent_dim (0 = d_model / 4, as CART's anchor latent).
- CART's reference code applies RoPE to the full up-projected Q and K (no decoupled part,
  so its cache could not stay latent); at d=1024, R=6 both forms count within 1% of the
  paper's 125M stored / 179M effective (tests/test_mla.py).

Decoding caches (c, k_R) per token: C + R numbers instead of 2 n_h Dh. `attend_latent`
runs the absorbed form (W_UK folded into the query, W_UV after the attention) as multi-query
attention over the latent through the same seam.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from modeling import axes as ax
from modeling import layers, rope, scopes
from modeling.attention import self_attention_kwargs
from modeling.transformer import Block, Runtime, dtype_of


def latent_dim(cfg: Any) -> int:
  return cfg.cart.kv_latent_dim or cfg.d_model // 4


def rope_dim(cfg: Any) -> int:
  return cfg.cart.mla_rope_dim or cfg.head_dim // 2


def validate(cfg: Any) -> None:
  R, Dh = rope_dim(cfg), cfg.head_dim
  if R % 2 or not 0 < R < Dh:
    raise ValueError(f'model.cart.mla_rope_dim={cfg.cart.mla_rope_dim} (rotary width {R}) must '
                     f'be even and lie in (0, model.head_dim={Dh}); 0 = head_dim // 2')
  if not cfg.rope_theta:
    raise ValueError('MLA needs rotary positions for its decoupled key: model.rope_theta=0 '
                     "is not supported with model.cart.*_attention='mla'; valid: > 0, or 'gqa'")


def parameter_count(cfg: Any) -> int:
  """Parameters of one MLA attention (paper note 8's formula with content width Dh - R)."""
  D, H, Dh, C, R = cfg.d_model, cfg.num_heads, cfg.head_dim, latent_dim(cfg), rope_dim(cfg)
  return (D * C + C + C * H * (Dh - R) + C * H * Dh + D * R + D * H * Dh + H * Dh * D)


class MLAttention(nnx.Module):
  """Causal MLA self-attention with the interface of `transformer.Attention` (query,
  key_value, __call__ -> (out, kv), _project), so `Block` and its ping-pong schedule use it."""

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs, runtime: Runtime, window: int = 0):
    validate(cfg)
    D, H, Dh, C, R = cfg.d_model, cfg.num_heads, cfg.head_dim, latent_dim(cfg), rope_dim(cfg)
    pdt, init = dtype_of(cfg.param_dtype), layers.normal(cfg.init_std)
    self.w_dkv = layers.param(rngs, init, (D, C), (ax.EMBED, None), pdt)
    self.kv_norm = layers.RMSNorm(C, eps=cfg.norm_eps, rngs=rngs, param_dtype=pdt)
    self.w_uk = layers.param(rngs, init, (C, H, Dh - R), (None, ax.HEADS, None), pdt)
    self.w_uv = layers.param(rngs, init, (C, H, Dh), (None, ax.HEADS, None), pdt)
    self.w_kr = layers.param(rngs, init, (D, R), (ax.EMBED, None), pdt)
    # W_UQ and W_QR side by side: the last R features of each head are the rotary part.
    self.wq = layers.param(rngs, init, (D, H, Dh), (ax.EMBED, ax.HEADS, None), pdt)
    self.wo = layers.param(rngs, init, (H, Dh, D), (ax.HEADS, None, ax.EMBED), pdt)
    self.rope_dim, self.rope_theta = R, cfg.rope_theta
    self.rope = rope.from_model(cfg)   # theta + model.rope_scaling (modeling/rope.py)
    self.causal, self.window = True, window
    self.dtype = dtype_of(cfg.dtype)
    self.runtime = runtime

  def _project(self, x, w, n_in=1):
    return layers.dense(x, w.astype(self.dtype), n_in, self.runtime.flatten_tokens)

  def _rope_tail(self, x_BLHD, positions_BL):
    """RoPE on the last rope_dim features only (the decoupled part)."""
    R = self.rope_dim
    return jnp.concatenate([x_BLHD[..., :-R],
                            layers.rotary(x_BLHD[..., -R:], positions_BL, self.rope)], -1)

  def query(self, x_BLD, positions_BL):
    return self._rope_tail(self._project(x_BLD, self.wq[...]), positions_BL)

  def latent(self, x_BLD, positions_BL):
    """What a decoding cache keeps per token: c [B, L, C] and the rotary key k_R [B, L, R]."""
    c_BLC = self.kv_norm(self._project(x_BLD, self.w_dkv[...]))
    kr_BL1R = layers.rotary(self._project(x_BLD, self.w_kr[...])[:, :, None], positions_BL,
                            self.rope)
    return c_BLC, kr_BL1R[:, :, 0]

  def expand(self, c_BSC, kr_BSR):
    """Per-head keys and values [B, S, H, Dh] from the latent and the shared rotary key."""
    k_BSHN = self._project(c_BSC, self.w_uk[...])
    v_BSHD = self._project(c_BSC, self.w_uv[...])
    H = k_BSHN.shape[2]
    kr_BSHR = jnp.broadcast_to(kr_BSR[:, :, None].astype(k_BSHN.dtype),
                               (*kr_BSR.shape[:2], H, kr_BSR.shape[-1]))
    return jnp.concatenate([k_BSHN, kr_BSHR], -1), v_BSHD

  def key_value(self, x_BLD, positions_BL):
    return self.expand(*self.latent(x_BLD, positions_BL))

  def __call__(self, x_BLD, *, segment_ids, positions, kv=None, attn_plan=None):
    """Returns (output, (k, v)); `kv` substitutes keys and values computed elsewhere."""
    c = self.runtime.constrain
    x_BLD = x_BLD.astype(self.dtype)
    q_BLHD = c(self.query(x_BLD, positions), (ax.BATCH, ax.LENGTH, ax.ACT_HEADS, None))
    if kv is None:
      kv = self.key_value(x_BLD, positions)
    k_BLHD, v_BLHD = (c(t, (ax.BATCH, ax.LENGTH, ax.ACT_HEADS, None)) for t in kv)
    with jax.named_scope(scopes.ATTENTION_SCOPE):
      o_BLHD = self.runtime.attend(q_BLHD, k_BLHD, v_BLHD, causal=True, window=self.window,
                                   **self_attention_kwargs(segment_ids, positions, attn_plan))
    o_BLHD = checkpoint_name(o_BLHD, 'attention_out')
    return self._project(o_BLHD, self.wo[...], n_in=2), kv

  def attend_latent(self, q_BTHD, c_BSC, kr_BSR, attend_kwargs):
    """The absorbed form: scores q_C W_UK^T c + q_R k_R, output (p c) W_UV, as one multi-query
    attention over [c ; k_R] through the seam. Equals attending over `expand(c, k_R)`."""
    R, dt = self.rope_dim, self.dtype
    Dh, C = q_BTHD.shape[-1], c_BSC.shape[-1]
    qc_BTHC = jnp.einsum('bthn,chn->bthc', q_BTHD[..., :-R], self.w_uk[...].astype(dt))
    # The seam scales by 1/sqrt(its head width C + R); MLA's scale is 1/sqrt(Dh).
    scale = ((C + R) / Dh) ** 0.5
    q_BTHE = jnp.concatenate([qc_BTHC, q_BTHD[..., -R:]], -1) * scale
    k_BS1E = jnp.concatenate([c_BSC, kr_BSR.astype(c_BSC.dtype)], -1)[:, :, None]
    v_BS1E = jnp.pad(c_BSC, ((0, 0), (0, 0), (0, R)))[:, :, None]   # values: c, zero-padded
    o_BTHE = self.runtime.attend(q_BTHE.astype(dt), k_BS1E.astype(dt), v_BS1E.astype(dt),
                                 causal=True, window=self.window, **attend_kwargs)
    o_BTHD = jnp.einsum('bthc,chd->bthd', o_BTHE[..., :C], self.w_uv[...].astype(dt))
    return jnp.einsum('bthd,hde->bte', o_BTHD, self.wo[...].astype(dt))


class MLABlock(Block):
  """A pre-norm layer (`transformer.Block`: residuals, MLP, the runtime's layer schedule) whose
  attention is MLA. Every linear map is drawn N(0, init_std), as CART's reference does."""

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs, runtime: Runtime):
    super().__init__(cfg, rngs=rngs, runtime=runtime, attention=MLAttention,
                     mlp_out_std=cfg.init_std)


# --- decoding: a latent cache per layer ---

def init_cache(cfg: Any, batch: int, max_len: int) -> tuple[jax.Array, jax.Array]:
  """(c [B, S, C], k_R [B, S, R]) zeros."""
  dt = dtype_of(cfg.dtype)
  return (jnp.zeros((batch, max_len, latent_dim(cfg)), dt),
          jnp.zeros((batch, max_len, rope_dim(cfg)), dt))


def extend_block(block: MLABlock, x_BTD, cache, start, attend_kwargs):
  """One MLABlock over T new tokens at positions start..: writes their (c, k_R) into the
  cache and attends over it in the absorbed form. Returns (x, cache)."""
  attn = block.attn
  h_BTD = block.attn_norm(x_BTD).astype(attn.dtype)
  positions_BT = attend_kwargs['q_positions']
  q_BTHD = attn.query(h_BTD, positions_BT)
  c_new, kr_new = attn.latent(h_BTD, positions_BT)
  c_cache = jax.lax.dynamic_update_slice(cache[0], c_new.astype(cache[0].dtype), (0, start, 0))
  kr_cache = jax.lax.dynamic_update_slice(cache[1], kr_new.astype(cache[1].dtype), (0, start, 0))
  x_BTD = x_BTD + attn.attend_latent(q_BTHD, c_cache, kr_cache, attend_kwargs)
  x_BTD = x_BTD + block.mlp(block.mlp_norm(x_BTD))
  return x_BTD, (c_cache, kr_cache)
