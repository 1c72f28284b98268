"""Dense decoder-only transformer: the GQA/RoPE/SwiGLU baseline every family is measured against.

Pre-norm blocks, x <- x + Attn(RMSNorm(x)); x <- x + MLP(RMSNorm(x)), with grouped-query
attention (Ainslie et al., 2023) and rotary positions (Su et al., 2021).
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from modeling import axes as ax
from modeling import kv_routing, layers, rope, scopes
from modeling.runtime import Runtime, self_attention_kwargs

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'save_attention_out': jax.checkpoint_policies.save_only_these_names('attention_out'),
}


def dtype_of(name: str):
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}[name]


def remat_policy(name: str):
  if name not in REMAT_POLICIES:
    raise ValueError(f'model.remat={name!r}; valid: {sorted(REMAT_POLICIES)}')
  return REMAT_POLICIES[name]


class Attention(nnx.Module):
  """Grouped-query self-attention; K/V projections are exposed for cache sharing."""

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs, runtime: Runtime, causal: bool = True,
               window: int = 0, use_rope: bool | None = None):
    D, H, K, Dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if H % K:
      raise ValueError(f'model.num_kv_heads={K} must divide model.num_heads={H}')
    pdt = dtype_of(cfg.param_dtype)
    std, out_std = cfg.init_std, cfg.init_std / (2 * cfg.num_layers) ** 0.5
    self.wq = layers.param(rngs, layers.normal(std), (D, H, Dh), (ax.EMBED, ax.HEADS, None), pdt)
    self.wk = layers.param(rngs, layers.normal(std), (D, K, Dh), (ax.EMBED, ax.KV_HEADS, None), pdt)
    self.wv = layers.param(rngs, layers.normal(std), (D, K, Dh), (ax.EMBED, ax.KV_HEADS, None), pdt)
    self.wo = layers.param(rngs, layers.normal(out_std), (H, Dh, D), (ax.HEADS, None, ax.EMBED),
                           pdt)
    self.rope_theta = cfg.rope_theta if use_rope in (None, True) else 0.0
    self.rope = rope.from_model(cfg, self.rope_theta)  # theta + model.rope_scaling; None: NoPE
    self.causal, self.window = causal, window
    self.dtype = dtype_of(cfg.dtype)
    self.runtime = runtime

  def _rope(self, x_BLHD, positions_BL):
    return layers.rotary(x_BLHD, positions_BL, self.rope) if self.rope else x_BLHD

  def _project(self, x, w, n_in=1):
    return layers.dense(x, w.astype(self.dtype), n_in, self.runtime.flatten_tokens)

  def query(self, x_BLD, positions_BL):
    q_BLHD = self._project(x_BLD, self.wq[...])
    return self._rope(q_BLHD, positions_BL)

  def key_value(self, x_BLD, positions_BL):
    k_BLKD = self._project(x_BLD, self.wk[...])
    v_BLKD = self._project(x_BLD, self.wv[...])
    return self._rope(k_BLKD, positions_BL), v_BLKD

  def __call__(self, x_BLD, *, segment_ids, positions, kv=None, attn_plan=None):
    """Returns (output, (k, v)); `kv` substitutes another layer's keys and values;
    `attn_plan` is the batch's attention plan (a step input), if any."""
    c = self.runtime.constrain
    x_BLD = x_BLD.astype(self.dtype)
    q_BLHD = c(self.query(x_BLD, positions), (ax.BATCH, ax.LENGTH, ax.ACT_HEADS, None))
    if kv is None:
      kv = self.key_value(x_BLD, positions)
    k_BLKD, v_BLKD = kv
    with jax.named_scope(scopes.ATTENTION_SCOPE):
      o_BLHD = self.runtime.attend(q_BLHD, k_BLKD, v_BLKD, causal=self.causal,
                                   window=self.window,
                                   **self_attention_kwargs(segment_ids, positions, attn_plan))
    o_BLHD = checkpoint_name(o_BLHD, 'attention_out')
    out_BLD = self._project(o_BLHD, self.wo[...], n_in=2)
    return out_BLD, kv


class Block(nnx.Module):
  """One pre-norm transformer layer. It exposes its stages (`pre`, `post`, `pin`) and the
  plain order (`forward`); the runtime's `layer_schedule` decides how they run
  (`modeling/runtime.py`)."""

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs, runtime: Runtime, attention=None,
               mlp_out_std: float | None = None):
    """`attention`: the attention module's class (default GQA `Attention`; CART's MLA blocks
    pass theirs); `mlp_out_std`: the MLP output init std (default scaled by depth)."""
    pdt = dtype_of(cfg.param_dtype)
    self.attn_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, param_dtype=pdt)
    self.attn = (attention or Attention)(cfg, rngs=rngs, runtime=runtime,
                                         window=cfg.sliding_window)
    self.mlp_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, param_dtype=pdt)
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5 if mlp_out_std is None else mlp_out_std
    self.mlp = layers.SwiGLU(cfg.d_model, cfg.mlp_dim, init_std=cfg.init_std, rngs=rngs,
                             constrain=runtime.constrain, dtype=dtype_of(cfg.dtype),
                             param_dtype=pdt, out_std=out_std,
                             flatten_tokens=runtime.flatten_tokens)
    self.constrain = runtime.constrain
    self.schedule = runtime.layer_schedule

  def __call__(self, x_BLD, *, segment_ids, positions, kv=None, attn_plan=None):
    return self.schedule(self, x_BLD, segment_ids=segment_ids, positions=positions, kv=kv,
                         attn_plan=attn_plan)

  def forward(self, x_BLD, *, segment_ids, positions, kv=None, attn_plan=None):
    """pre -> attend -> post in one go (the default schedule)."""
    a_BLD, kv = self.attn(self.attn_norm(x_BLD), segment_ids=segment_ids, positions=positions,
                          kv=kv, attn_plan=attn_plan)
    x_BLD = x_BLD + a_BLD
    x_BLD = x_BLD + self.mlp(self.mlp_norm(x_BLD))
    return self.pin(x_BLD), kv

  def pre(self, x_BLD, positions):
    """Norm, Q/K/V projections and RoPE (the part before core attention): (q, k, v)."""
    h_BLD = self.attn_norm(x_BLD).astype(self.attn.dtype)
    k_BLKD, v_BLKD = self.attn.key_value(h_BLD, positions)
    return self.attn.query(h_BLD, positions), k_BLKD, v_BLKD

  def post(self, x_BLD, o_BLHD):
    """Output projection, residual and MLP (the part after core attention)."""
    o_BLHD = checkpoint_name(o_BLHD, 'attention_out')
    x_BLD = x_BLD + self.attn._project(o_BLHD, self.attn.wo[...], n_in=2)
    return x_BLD + self.mlp(self.mlp_norm(x_BLD))

  def pin(self, x_BLD):
    return self.constrain(x_BLD, (ax.BATCH, ax.LENGTH, ax.ACT_EMBED))


class Transformer(nnx.Module):
  """Embedding -> N blocks (a Python loop, or one scanned stack) -> RMSNorm -> LM head."""

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs, runtime: Runtime = Runtime()):
    pdt = dtype_of(cfg.param_dtype)
    self.cfg = cfg
    self.runtime = runtime
    self.embed = layers.Embedding(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std, rngs=rngs,
                                  param_dtype=pdt, constrain=runtime.constrain)
    if cfg.scan_layers:
      self.blocks = _stacked_blocks(cfg, rngs, runtime)
    else:
      self.blocks = nnx.List([Block(cfg, rngs=rngs, runtime=runtime)
                              for _ in range(cfg.num_layers)])
    self.final_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, param_dtype=pdt)
    if not cfg.tie_embeddings:
      self.head = layers.param(rngs, layers.normal(cfg.init_std), (cfg.d_model, cfg.vocab_size),
                               (ax.EMBED, ax.VOCAB), pdt)

  def __call__(self, tokens_BL, *, segment_ids, positions, rng=None,
               kv_plan: kv_routing.CachePlan | None = None, attn_plan=None):
    """Final-normed hidden states [B, L, D]; `logits` maps them to the vocabulary.

    `rng` (training) draws K/V routes when model.kv_routing.p < 1; in eval the layers share
    caches by `kv_plan`, by default the config's plan (see kv_routing.layer_routes).
    `attn_plan` is the batch's attention plan (a step input: disaggregation's task plan).
    """
    x_BLD = self.embed(tokens_BL, dtype_of(self.cfg.dtype))
    x_BLD = apply_blocks(self.blocks, x_BLD, scanned=self.cfg.scan_layers,
                         remat=self.cfg.remat, segment_ids=segment_ids, positions=positions,
                         attn_plan=attn_plan, kv_routes=kv_routing.layer_routes(self.cfg, rng, kv_plan))
    return self.final_norm(x_BLD)

  def head_matrix(self) -> jax.Array:
    """The [D, V] output projection (the embedding table when tied)."""
    return self.embed.table[...].T if self.cfg.tie_embeddings else self.head[...]

  def logits(self, h_BLD):
    return layers.dense(h_BLD, self.head_matrix().astype(h_BLD.dtype),
                        flatten_tokens=self.runtime.flatten_tokens)


def _stacked_blocks(cfg, rngs, runtime):
  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: ax.LAYERS})
  def make(rngs):
    return Block(cfg, rngs=rngs, runtime=runtime)
  return make(rngs)


def apply_blocks(blocks, x_BLD, *, scanned: bool, remat: str,
                 kv_routes: kv_routing.Routes | None = None, **kwargs):
  """Runs the layer stack, optionally scanned and rematerialised per layer.

  `kv_routes` (None = each layer its own K/V) lets layers attend with other layers' K/V.
  """
  policy = remat_policy(remat)
  if kv_routes is not None:
    return kv_routing.apply_routed_blocks(blocks, x_BLD, kv_routes, scanned=scanned,
                                          policy=policy, **kwargs)

  def one(block, x):
    return block(x, **kwargs)[0]

  if not scanned:
    step = nnx.remat(one, policy=policy) if policy is not None else one
    for block in blocks:
      x_BLD = step(block, x_BLD)
    return x_BLD

  graphdef, stacked = nnx.split(blocks)

  def body(x, layer_state):
    return one(nnx.merge(graphdef, layer_state), x), None

  if policy is not None:
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
  x_BLD, _ = jax.lax.scan(body, x_BLD, stacked)
  return x_BLD


def forward_flops_per_token(cfg: Any, seq_len: int, *, causal: bool = True) -> float:
  """Model FLOPs of one forward pass per token (docs/measuring.md): 2 x matmul params + attention."""
  D, H, K, Dh, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  per_layer = D * Dh * (H + 2 * K) + H * Dh * D + 3 * D * F
  matmul_params = cfg.num_layers * per_layer + D * cfg.vocab_size
  kv_len = min(cfg.sliding_window, seq_len) if cfg.sliding_window else seq_len
  attn = 4 * kv_len * H * Dh * cfg.num_layers * (0.5 if causal and not cfg.sliding_window else 1)
  return 2.0 * matmul_params + attn


def planner_cost(cfg: Any) -> tuple[float, float]:
  """Forward FLOPs of one document as (per token, per causal query-key pair) for the planners'
  cost models (linear x s + pair x s(s+1)/2); a sliding window makes attention per token."""
  attn = 4.0 * cfg.num_heads * cfg.head_dim * cfg.num_layers
  no_attention = forward_flops_per_token(cfg, 0)
  if cfg.sliding_window:
    return no_attention + attn * cfg.sliding_window, 0.0
  return no_attention, attn
