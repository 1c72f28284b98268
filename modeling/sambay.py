"""SambaY: a Samba self-decoder and a YOCO cross-decoder whose layers alternate GMU and
cross-attention over one shared KV cache.

Ren et al., "Decoder-Hybrid-Decoder Architecture for Efficient Reasoning with Long
Generation" (2025). Layer roles for L layers (L % 4 == 0), each followed by a SwiGLU MLP:

    i < L/2, even  Mamba-1             i = L/2      Mamba that emits the memory m
    i < L/2, odd   sliding-window attn i = L/2 + 1  full attention: its (K, V) is THE cache
    i > L/2+1, even  GMU(x, m)         i > L/2+1, odd  cross-attention (own W_q, W_o only)

Gated Memory Unit: y = (m * SiLU(x W1)) W2, m the memory layer's pre-gate scan output.
Every attention (window, full) goes through `runtime.attend`, the cross-attention over the
shared K/V through `runtime.shared_kv` (gathered once for all readers), and every Mamba's
order-dependent ops (conv, segment starts, scan) through `runtime.recurrence`. No layer uses
rotary positions by default (NoPE): Mamba supplies order.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from modeling import axes as ax
from modeling import layers, rope, shared_kv, ssm
from modeling.runtime import Runtime
from modeling.transformer import Attention, dtype_of, remat_policy

MAMBA, SWA, MEMORY, FULL, GMU_ROLE, CROSS = 'mamba', 'swa', 'memory', 'full', 'gmu', 'cross'
_SINGLE_DEVICE = Runtime()


def layer_roles(num_layers: int) -> tuple[str, ...]:
  """The role of each layer, exactly as the paper's table assigns them."""
  if num_layers % 4 or num_layers < 4:
    raise ValueError(f'model.num_layers={num_layers}: sambay needs a positive multiple of 4')
  half = num_layers // 2
  roles = []
  for i in range(num_layers):
    if i < half:
      roles.append(MAMBA if i % 2 == 0 else SWA)
    elif i == half:
      roles.append(MEMORY)
    elif i == half + 1:
      roles.append(FULL)
    else:
      roles.append(GMU_ROLE if i % 2 == 0 else CROSS)
  return tuple(roles)


class GMU(nnx.Module):
  """Gated Memory Unit: y = (m * SiLU(x W1)) W2, no bias; m is not detached."""

  def __init__(self, d_model: int, d_memory: int, *, init_std: float, out_std: float,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.w1 = layers.param(rngs, layers.normal(init_std), (d_model, d_memory),
                           (ax.EMBED, ax.MLP), param_dtype)
    self.w2 = layers.param(rngs, layers.normal(out_std), (d_memory, d_model),
                           (ax.MLP, ax.EMBED), param_dtype)
    self.dtype = dtype

  def __call__(self, x_BLD, m_BLE):
    gate_BLE = jax.nn.silu(x_BLD.astype(self.dtype) @ self.w1[...].astype(self.dtype))
    return (m_BLE.astype(self.dtype) * gate_BLE) @ self.w2[...].astype(self.dtype)


class CrossAttention(nnx.Module):
  """YOCO cross-attention: its own queries and output projection over a shared (K, V)."""

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs, runtime: Runtime, rope_theta: float):
    D, H, Dh = cfg.d_model, cfg.num_heads, cfg.head_dim
    pdt = dtype_of(cfg.param_dtype)
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    self.wq = layers.param(rngs, layers.normal(cfg.init_std), (D, H, Dh),
                           (ax.EMBED, ax.HEADS, None), pdt)
    self.wo = layers.param(rngs, layers.normal(out_std), (H, Dh, D), (ax.HEADS, None, ax.EMBED),
                           pdt)
    self.rope_theta = rope_theta
    self.rope = rope.from_model(cfg, rope_theta)  # theta + model.rope_scaling; None: NoPE
    self.dtype = dtype_of(cfg.dtype)
    self.runtime = runtime

  def __call__(self, x_BLD, kv, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
               attend=None):
    """`attend` (default: the runtime's) reads (K, V) in the form `SharedKV.gather` gave."""
    q_BLHD = jnp.einsum('bld,dhk->blhk', x_BLD.astype(self.dtype), self.wq[...].astype(self.dtype))
    if self.rope_theta:   # the cached keys were rotated by the full-attention layer
      q_BLHD = layers.rotary(q_BLHD, q_positions, self.rope)
    q_BLHD = self.runtime.constrain(q_BLHD, (ax.BATCH, ax.LENGTH, ax.ACT_HEADS, None))
    k_BSKD, v_BSKD = kv
    o_BLHD = (attend or self.runtime.attend)(
        q_BLHD, k_BSKD, v_BSKD, causal=True, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, q_positions=q_positions, kv_positions=kv_positions)
    return jnp.einsum('blhk,hkd->bld', o_BLHD, self.wo[...].astype(self.dtype))


class Layer(nnx.Module):
  """x <- x + mixer(RMSNorm(x)); x <- x + MLP(RMSNorm(x)), the mixer chosen by `role`."""

  def __init__(self, role: str, cfg: Any, *, rngs: nnx.Rngs, runtime: Runtime,
               recurrence: ssm.Recurrence):
    pdt, dt = dtype_of(cfg.param_dtype), dtype_of(cfg.dtype)
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    self.role = role
    self.norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, param_dtype=pdt)
    if role in (MAMBA, MEMORY):
      self.mixer = ssm.Mamba(cfg, rngs=rngs, recurrence=recurrence,
                             constrain=runtime.constrain, dtype=dt, param_dtype=pdt)
    elif role in (SWA, FULL):
      self.mixer = Attention(cfg, rngs=rngs, runtime=runtime, use_rope=not cfg.sambay.nope,
                             window=cfg.sambay.window if role == SWA else 0)
    elif role == GMU_ROLE:
      self.mixer = GMU(cfg.d_model, ssm.dims(cfg)[0], init_std=cfg.init_std, out_std=out_std,
                       rngs=rngs, dtype=dt, param_dtype=pdt)
    elif role == CROSS:
      self.mixer = CrossAttention(cfg, rngs=rngs, runtime=runtime,
                                  rope_theta=0.0 if cfg.sambay.nope else cfg.rope_theta)
    else:
      raise ValueError(f'unknown sambay layer role {role!r}')
    self.mlp_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, param_dtype=pdt)
    self.mlp = layers.SwiGLU(cfg.d_model, cfg.mlp_dim, init_std=cfg.init_std, rngs=rngs,
                             constrain=runtime.constrain, dtype=dt, param_dtype=pdt,
                             out_std=out_std)
    self.constrain = runtime.constrain
    self.shared = runtime.shared_kv or shared_kv.Unshared(runtime.attend)

  def __call__(self, x_BLD, memory, kv, *, segment_ids, positions):
    """Returns (x, memory, kv): the memory layer sets m, the full layer sets the shared
    (K, V, kv segment ids, kv positions), gathered once for every cross-attention layer."""
    h_BLD = self.norm(x_BLD)
    if self.role in (MAMBA, MEMORY):
      out_BLD, y_BLE = self.mixer(h_BLD, segment_ids=segment_ids)
      if self.role == MEMORY:
        memory = y_BLE
    elif self.role in (SWA, FULL):
      out_BLD, own_kv = self.mixer(h_BLD, segment_ids=segment_ids, positions=positions)
      if self.role == FULL:
        kv = self.shared.gather(*own_kv, segment_ids, positions)
    elif self.role == GMU_ROLE:
      out_BLD = self.mixer(h_BLD, memory)
    else:
      out_BLD = self.mixer(h_BLD, kv[:2], q_segment_ids=segment_ids, kv_segment_ids=kv[2],
                           q_positions=positions, kv_positions=kv[3],
                           attend=self.shared.attend)
    return self.residual_mlp(x_BLD, out_BLD), memory, kv

  def residual_mlp(self, x_BLD, out_BLD):
    x_BLD = x_BLD + out_BLD
    x_BLD = x_BLD + self.mlp(self.mlp_norm(x_BLD))
    return self.constrain(x_BLD, (ax.BATCH, ax.LENGTH, ax.ACT_EMBED))


class SambaY(nnx.Module):
  """Embedding -> self-decoder -> memory + shared-KV layers -> cross-decoder -> RMSNorm -> head.

  Mamba layers take their order-dependent ops from `runtime.recurrence`; when that is None,
  from `scan_fn`, and when that is None too, from the single-device scan named by
  `model.sambay.scan_impl`.
  """

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs, runtime: Runtime = _SINGLE_DEVICE,
               scan_fn: ssm.ScanFn | None = None):
    if cfg.scan_layers:
      raise ValueError('model.scan_layers=True is not supported by model.name=sambay (its '
                       'layers differ in kind); valid: False')
    if cfg.sambay.window < 1:
      raise ValueError(f'model.sambay.window={cfg.sambay.window} must be >= 1')
    pdt = dtype_of(cfg.param_dtype)
    self.cfg = cfg
    self.runtime = runtime
    self.roles = layer_roles(cfg.num_layers)
    recurrence = runtime.recurrence
    if recurrence is None:
      recurrence = ssm.LocalRecurrence(
          scan_fn or ssm.make_scan(cfg.sambay.scan_impl, cfg.sambay.scan_chunk))
    self.embed = layers.Embedding(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std, rngs=rngs,
                                  param_dtype=pdt)
    self.layers = nnx.List([Layer(r, cfg, rngs=rngs, runtime=runtime, recurrence=recurrence)
                            for r in self.roles])
    self.final_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, param_dtype=pdt)
    if not cfg.tie_embeddings:
      self.head = layers.param(rngs, layers.normal(cfg.init_std), (cfg.d_model, cfg.vocab_size),
                               (ax.EMBED, ax.VOCAB), pdt)

  def __call__(self, tokens_BL, *, segment_ids, positions, rng=None, attn_plan=None):
    """Final-normed hidden states [B, L, D]; `logits` maps them to the vocabulary."""
    del rng  # deterministic
    if attn_plan is not None:
      raise ValueError('model.name=sambay takes no per-batch attention plan: its window '
                       "layers refuse parallelism.context_impl='disaggregated'")
    return self.forward_embedded(self.embed_tokens(tokens_BL), segment_ids=segment_ids,
                                 positions=positions)

  def embed_tokens(self, tokens_BL):
    return self.runtime.constrain(self.embed(tokens_BL, dtype_of(self.cfg.dtype)),
                                  (ax.BATCH, ax.LENGTH, ax.ACT_EMBED))

  def forward_embedded(self, x_BLD, *, segment_ids, positions):
    policy = remat_policy(self.cfg.remat)

    def one(layer, x, memory, kv):
      return layer(x, memory, kv, segment_ids=segment_ids, positions=positions)

    step = nnx.remat(one, policy=policy) if policy is not None else one
    memory = kv = None
    for layer in self.layers:
      x_BLD, memory, kv = step(layer, x_BLD, memory, kv)
    return self.final_norm(x_BLD)

  def head_matrix(self) -> jax.Array:
    """The [D, V] output projection (the embedding table when tied)."""
    return self.embed.table[...].T if self.cfg.tie_embeddings else self.head[...]

  def logits(self, h_BLD):
    return h_BLD @ self.head_matrix().astype(h_BLD.dtype)


def _sliding_kv_len(window: int, seq_len: int, causal: bool) -> float:
  """Mean keys per query under a window: causal averages min(window, position + 1)."""
  if not causal:
    return float(min(window, seq_len))
  w = min(window, seq_len)
  return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def forward_flops_per_token(cfg: Any, seq_len: int, *, causal: bool = True) -> float:
  """Model FLOPs of one forward pass per token (docs/measuring.md).

  2 x matmul params (LM head included) + attention 4 x S_kv x H x Dh per attention layer
  (full and cross: S_kv = seq_len, halved when causal; window: mean min(window, position))
  + per Mamba layer its projections, conv and the scan at 9 x d_inner x d_state.
  """
  D, H, K, Dh, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  E = ssm.dims(cfg)[0]
  full_kv = seq_len * (0.5 if causal else 1.0)
  attn_core = 4 * H * Dh
  per_role = {
      MAMBA: ssm.mamba_forward_flops_per_token(cfg),
      SWA: 2.0 * (D * Dh * (H + 2 * K) + H * Dh * D)
           + attn_core * _sliding_kv_len(cfg.sambay.window, seq_len, causal),
      FULL: 2.0 * (D * Dh * (H + 2 * K) + H * Dh * D) + attn_core * full_kv,
      GMU_ROLE: 2.0 * (2 * D * E),
      CROSS: 2.0 * (2 * D * H * Dh) + attn_core * full_kv,
  }
  per_role[MEMORY] = per_role[MAMBA]
  total = sum(per_role[r] + 2.0 * 3 * D * F for r in layer_roles(cfg.num_layers))
  return total + 2.0 * D * cfg.vocab_size


def recurrence_flops_per_token(cfg: Any) -> float:
  """Forward FLOPs per token spent in selective scans (every Mamba and memory layer): the
  part of `forward_flops_per_token` that runs at a scan's speed, not a matmul's."""
  E, N = ssm.dims(cfg)[:2]
  scans = sum(r in (MAMBA, MEMORY) for r in layer_roles(cfg.num_layers))
  return scans * ssm.scan_flops_per_token(E, N)


def scan_probe(cfg: Any, length: int):
  """One Mamba layer's selective scan over `length` tokens, for timing (the planner's
  calibration): (loss_fn, args, forward FLOPs of one call). The scan is the configured one
  (`model.sambay.scan_impl`), on random inputs of the layer's shapes, float32."""
  import numpy as np
  E, N = ssm.dims(cfg)[:2]
  scan_fn = ssm.make_scan(cfg.sambay.scan_impl, cfg.sambay.scan_chunk)
  r = np.random.RandomState(0)
  x = r.randn(1, length, E).astype(np.float32)
  dt = np.abs(r.randn(1, length, E)).astype(np.float32) * 0.1
  A = -np.abs(r.randn(E, N)).astype(np.float32)
  B, C = (r.randn(1, length, N).astype(np.float32) for _ in range(2))
  reset = np.zeros((1, length), bool)

  def loss(x, dt, A, B, C):
    return scan_fn(x, dt, A, B, C, reset_BL=reset)[0].sum()
  return loss, (x, dt, A, B, C), length * ssm.scan_flops_per_token(E, N)


def planner_cost(cfg: Any) -> tuple[float, float]:
  """Forward FLOPs of one document as (per token, per causal query-key pair), by layer kind:
  Mamba/memory, GMU and MLPs per token; sliding-window attention per token at its full window
  (exact once the document is longer than the window); the full-attention layer and every
  cross-attention layer per causal pair over the document."""
  H, Dh = cfg.num_heads, cfg.head_dim
  roles = layer_roles(cfg.num_layers)
  pair_layers = sum(r in (FULL, CROSS) for r in roles)
  swa_layers = sum(r == SWA for r in roles)
  attn = 4.0 * H * Dh
  # At seq_len 1 every window and full attention sees one key (half a pair when causal).
  no_attention = forward_flops_per_token(cfg, 1) - attn * (swa_layers + 0.5 * pair_layers)
  return no_attention + swa_layers * attn * cfg.sambay.window, pair_layers * attn
