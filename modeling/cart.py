"""CART: a prelude builds a context anchor, one shared core block runs R times against it.

"CART: Context-Anchored Recurrent Transformer" (C. Capps, arXiv 2606.01495, 2026):

    e  = Prelude_P(Emb(tokens))                 P causal RoPE self-attention layers
    K, V = AnchorKV(e)                          once, through a d/4 latent
    buf = [e, e, e]                             newest first
    for r in 0..R-1:
      hh = sum_i softmax(theta)_i buf[i] + W_lie pe[r]
      f  = Core(hh; K, V)                       causal cross-attention + SwiGLU, residuals kept
      h  = sigmoid(a) * hh + f;  buf = [h, buf[0], buf[1]]
    logits = RMSNorm(Coda(h)) Emb^T

How many times the core runs: `loops=` when given; else `cart.loops` when the model gets a
training rng and `cart.eval_loops` (0 = `cart.loops`) when rng is None. Any R up to
`cart.max_loops` (the loop-index table) works on the same parameters.

The prelude and coda are MLA self-attention layers (modeling/mla.py, DeepSeek-V2's form with a
decoupled RoPE key) as in the paper, or loomax's GQA `Block` (full-rank K/V) with
model.cart.prelude_attention / coda_attention = 'gqa'; either way every linear map is drawn
N(0, init_std), the reference's flat init.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from modeling import axes as ax
from modeling import layers, mla
from modeling.cart_core import AnchorKV, CoreBlock, LoopGlue, kv_latent_dim, loop_index_table
from modeling.runtime import Runtime
from modeling.transformer import (
  REMAT_POLICIES,
  Block,
  apply_blocks,
  dtype_of,
  remat_policy,
)


# model.cart.{prelude,coda}_attention -> the self-attention layer kind.
SELF_ATTENTION = ('mla', 'gqa')


def _validate(cfg: Any) -> None:
  c = cfg.cart
  if cfg.scan_layers:
    raise ValueError("model.scan_layers=True is not supported by model.name='cart' "
                     '(prelude and coda run as a Python loop); valid: False')
  if cfg.num_heads % cfg.num_kv_heads:
    raise ValueError(f'model.num_kv_heads={cfg.num_kv_heads} must divide '
                     f'model.num_heads={cfg.num_heads}')
  if c.loops < 1 or c.eval_loops < 0:
    raise ValueError(f'model.cart.loops={c.loops} must be >= 1 and model.cart.eval_loops='
                     f'{c.eval_loops} >= 0 (0 = loops)')
  if c.hyper_slots < 1:
    raise ValueError(f'model.cart.hyper_slots={c.hyper_slots} must be >= 1')
  if not 0.0 < c.lti_init < 1.0:
    raise ValueError(f'model.cart.lti_init={c.lti_init} must lie in (0, 1)')
  if c.loop_embed_dim % 2:
    raise ValueError(f'model.cart.loop_embed_dim={c.loop_embed_dim} must be even (sin, cos)')
  for key in ('prelude_attention', 'coda_attention'):
    if c[key] not in SELF_ATTENTION:
      raise ValueError(f'model.cart.{key}={c[key]!r}; valid: {sorted(SELF_ATTENTION)}')
    if c[key] == 'mla':
      mla.validate(cfg)
  if c.remat_loop not in REMAT_POLICIES:
    raise ValueError(f'model.cart.remat_loop={c.remat_loop!r}; valid: {sorted(REMAT_POLICIES)}')


class Cart(nnx.Module):
  """Embedding -> P prelude Blocks -> anchored loop of R core applications -> coda -> norm."""

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs, runtime: Runtime | None = None):
    _validate(cfg)
    runtime = runtime or Runtime()
    c, pdt = cfg.cart, dtype_of(cfg.param_dtype)
    self.cfg, self.runtime = cfg, runtime
    self.embed = layers.Embedding(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std,
                                  rngs=rngs, param_dtype=pdt)
    self.prelude = nnx.List([self._block(cfg, rngs, runtime, c.prelude_attention)
                            for _ in range(c.prelude_layers)])
    self.kv_proj = AnchorKV(cfg, rngs=rngs, runtime=runtime)
    if c.shared_core:
      self.core = CoreBlock(cfg, rngs=rngs, runtime=runtime)
    else:
      self.core = nnx.List([CoreBlock(cfg, rngs=rngs, runtime=runtime) for _ in range(c.loops)])
    self.glue = LoopGlue(cfg, rngs=rngs)
    self.coda = nnx.List([self._block(cfg, rngs, runtime, c.coda_attention)
                         for _ in range(c.coda_layers)])
    self.final_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, param_dtype=pdt)

  @staticmethod
  def _block(cfg, rngs, runtime, kind: str = 'gqa') -> Block:
    """A pre-norm self-attention layer, MLA or GQA; a GQA Block's depth-scaled output
    projections are re-drawn N(0, std): the reference initialises every Linear alike."""
    if kind == 'mla':
      return mla.MLABlock(cfg, rngs=rngs, runtime=runtime)
    block = Block(cfg, rngs=rngs, runtime=runtime)
    init = layers.normal(cfg.init_std)
    for w in (block.attn.wo, block.mlp.w_down):
      w[...] = init(rngs.params(), w.shape, w.dtype)
    return block

  # --- the model contract ---

  def __call__(self, tokens_BL, *, segment_ids, positions, rng=None, loops: int | None = None,
               attn_plan=None):
    """Final-normed hidden states [B, L, D]. CART is deterministic: rng only tells training
    (cart.loops) from eval (cart.eval_loops); `loops` overrides both. `attn_plan`: the
    batch's attention plan (a step input), if any."""
    R = self.num_loops(training=rng is not None, loops=loops)
    kw = dict(segment_ids=segment_ids, positions=positions, attn_plan=attn_plan)
    e_BLD = self.anchor(tokens_BL, **kw)
    h_BLD = self.recur(e_BLD, R, **kw)
    return self.finish(h_BLD, **kw)

  def head_matrix(self) -> jax.Array:
    return self.embed.table[...].T  # tied, as in the reference

  def logits(self, h_BLD):
    return h_BLD @ self.head_matrix().astype(h_BLD.dtype)

  def diagnostics(self) -> dict[str, jax.Array]:
    """cart/spectral_radius = max sigmoid(a); cart/hyper_weight_i = softmax(theta)_i."""
    out = {}
    if self.glue.gated:
      out['cart/spectral_radius'] = self.glue.spectral_radius()
    if self.glue.hyper:
      w = self.glue.hyper_weights()
      out.update({f'cart/hyper_weight_{i}': w[i] for i in range(self.glue.slots)})
    return out

  # --- the three stages, public so a test can unroll the loop by hand ---

  def num_loops(self, *, training: bool, loops: int | None = None) -> int:
    c = self.cfg.cart
    R = loops if loops is not None else (c.loops if training else (c.eval_loops or c.loops))
    if R < 1:
      raise ValueError(f'CART needs at least one core application; got R={R}')
    if c.loop_embedding and R > c.max_loops:
      raise ValueError(f'R={R} core applications exceed the loop-index table '
                       f'(model.cart.max_loops={c.max_loops} rows); valid: 1..{c.max_loops}')
    if not c.shared_core and R > c.loops:
      raise ValueError(f'model.cart.shared_core=False holds {c.loops} distinct core blocks '
                       f'(model.cart.loops); cannot run R={R}; valid: 1..{c.loops}')
    return R

  def anchor(self, tokens_BL, *, segment_ids, positions, attn_plan=None) -> jax.Array:
    """e = Prelude(Emb(tokens)): the context every core application reads."""
    x_BLD = self.runtime.constrain(self.embed(tokens_BL, dtype_of(self.cfg.dtype)),
                                   (ax.BATCH, ax.LENGTH, ax.ACT_EMBED))
    return apply_blocks(self.prelude, x_BLD, scanned=False, remat=self.cfg.remat,
                        segment_ids=segment_ids, positions=positions, attn_plan=attn_plan)

  def core_at(self, r: int) -> CoreBlock:
    return self.core if self.cfg.cart.shared_core else self.core[r]

  def recur(self, e_BLD, R: int, *, segment_ids, positions, attn_plan=None) -> jax.Array:
    """R core applications against K/V of the anchor; one rematerialisable step each."""
    c = self.cfg.cart
    kv = None if c.recompute_kv else self.kv_proj(e_BLD)
    pe_RC = jnp.asarray(loop_index_table(c.max_loops, c.loop_embed_dim)) if c.loop_embedding \
        else None
    step = loop_step
    policy = remat_policy(c.remat_loop)
    if policy is not None:
      # prevent_cse stays on: outside a scan, XLA would otherwise merge the recomputation
      # back into the forward pass and keep every iteration's activations alive.
      step = nnx.remat(loop_step, policy=policy)
    buf = (e_BLD,) * self.glue.slots
    for r in range(R):
      pe_C = None if pe_RC is None else pe_RC[r]
      h_BLD = step(self.core_at(r), self.glue, self.kv_proj, buf, pe_C, kv, segment_ids,
                   positions, attn_plan)
      buf = (h_BLD,) + buf[:-1]
    return buf[0]

  def finish(self, h_BLD, *, segment_ids, positions, attn_plan=None) -> jax.Array:
    h_BLD = apply_blocks(self.coda, h_BLD, scanned=False, remat=self.cfg.remat,
                         segment_ids=segment_ids, positions=positions, attn_plan=attn_plan)
    return self.final_norm(h_BLD)

  @staticmethod
  def parameter_counts(cfg: Any) -> tuple[int, int]:
    """(stored, effective) parameters, for reports (training/evaluation/study.py)."""
    return parameter_counts(cfg)

  @staticmethod
  def describe(cfg: Any) -> str:
    """One line for the training log: R, stored and effective parameter counts."""
    c = cfg.cart
    stored, effective = parameter_counts(cfg)
    return (f'cart: P={c.prelude_layers} R={c.loops} (eval R={c.eval_loops or c.loops}, '
            f'max {c.max_loops}) | stored {stored:,} | effective {effective:,} parameters '
            f'({effective / stored:.2f}x)')


def loop_step(core: CoreBlock, glue: LoopGlue, kv_proj: AnchorKV, buf, pe_C, kv, segment_ids,
              positions, attn_plan=None) -> jax.Array:
  """One iteration: hh = blend(buf) + W_lie pe[r]; h = sigmoid(a) hh + Core(hh; K, V).

  `kv` is None under the recompute ablation: K/V then come from the current state hh.
  """
  hh_BLD = glue.blend(buf, pe_C)
  k_BSKD, v_BSKD = kv if kv is not None else kv_proj(hh_BLD)
  f_BLD = core(hh_BLD, k_BSKD, v_BSKD, segment_ids=segment_ids, positions=positions,
               attn_plan=attn_plan)
  h_BLD = glue.gate(hh_BLD, f_BLD)
  return core.runtime.constrain(h_BLD, (ax.BATCH, ax.LENGTH, ax.ACT_EMBED))


def loop_state_rms(model: 'Cart', tokens_BL, *, segment_ids, positions,
                   attn_plan=None) -> dict[str, jax.Array]:
  """Training diagnostics (registry `batch_diagnostics`): cart/state_rms_loop_<r>, the RMS over
  real tokens of the state after core application r, running the model's own stages (anchor,
  loop_step) at the training R."""
  c = model.cfg.cart
  R = model.num_loops(training=True)
  kw = dict(segment_ids=segment_ids, positions=positions, attn_plan=attn_plan)
  e = model.anchor(tokens_BL, **kw)
  kv = None if c.recompute_kv else model.kv_proj(e)
  pe = jnp.asarray(loop_index_table(c.max_loops, c.loop_embed_dim)) if c.loop_embedding \
      else None
  real = (segment_ids > 0).astype(jnp.float32)[..., None]
  buf, out = (e,) * model.glue.slots, {}
  for r in range(R):
    h = loop_step(model.core_at(r), model.glue, model.kv_proj, buf, None if pe is None else pe[r],
                  kv, segment_ids, positions, attn_plan)
    buf = (h,) + buf[:-1]
    ms = jnp.sum(jnp.square(h.astype(jnp.float32)) * real) / (
        jnp.maximum(jnp.sum(real), 1.0) * h.shape[-1])
    out[f'cart/state_rms_loop_{r}'] = jnp.sqrt(ms)
  return out


# --- accounting ---

def _count(module: nnx.Module) -> int:
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


def parameter_counts(cfg: Any) -> tuple[int, int]:
  """(stored, effective) parameters. Effective counts the shared core once per application
  (and the K/V projection too under recompute_kv), as the reference's count_parameters does;
  an unshared core is already stored R times. Embedding counted once (tied head)."""
  frozen = ml_collections.FrozenConfigDict(cfg)
  model = nnx.eval_shape(lambda: Cart(frozen, rngs=nnx.Rngs(0)))
  stored = _count(model)
  c = frozen.cart
  if not c.shared_core:
    return stored, stored
  per_application = _count(model.core) + (_count(model.kv_proj) if c.recompute_kv else 0)
  return stored, stored + (c.loops - 1) * per_application


def forward_flops_per_token(cfg: Any, seq_len: int, *, causal: bool = True) -> float:
  """Model FLOPs of one forward pass per token (docs/measuring.md), counting all R = cart.loops
  core applications. 2 x matmul parameters + 4 x S x H x Dh per attention (half if causal).
  W_lie pe[r] is one vector per iteration, not per token, and is left out."""
  c = cfg.cart
  D, H, K, Dh, F, R = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, \
      c.loops
  C = kv_latent_dim(cfg)
  gqa_layer = D * Dh * (H + 2 * K) + H * Dh * D + 3 * D * F
  mla_layer = mla.parameter_count(cfg) - mla.latent_dim(cfg) + 3 * D * F   # less the norm
  layer = {'gqa': gqa_layer, 'mla': mla_layer}
  core = 2 * D * H * Dh + 3 * D * F
  kv = D * C + 2 * C * K * Dh
  n_self = c.prelude_layers + c.coda_layers
  self_params = (c.prelude_layers * layer[c.prelude_attention]
                 + c.coda_layers * layer[c.coda_attention])
  matmul_params = (self_params + R * core + (R if c.recompute_kv else 1) * kv
                   + D * cfg.vocab_size)
  self_kv_len = min(cfg.sliding_window, seq_len) if cfg.sliding_window else seq_len
  self_attn = 4 * self_kv_len * H * Dh * (0.5 if causal and not cfg.sliding_window else 1)
  core_attn = 4 * seq_len * H * Dh * (0.5 if causal else 1)
  return 2.0 * matmul_params + n_self * self_attn + R * core_attn


def planner_cost(cfg: Any) -> tuple[float, float]:
  """Forward FLOPs of one document as (per token, per causal query-key pair), for the planners'
  cost models (linear x s + pair x s(s+1)/2): the prelude and coda self-attention layers and
  R = cart.loops core cross-attentions each attend causally over the document; everything else
  is per token. Matches `forward_flops_per_token` (which counts s/2 keys per query) to O(1/s)."""
  c = cfg.cart
  n_self = c.prelude_layers + c.coda_layers
  attn = 4.0 * cfg.num_heads * cfg.head_dim
  no_attention = forward_flops_per_token(cfg, 0)   # seq_len 0: no query-key pairs
  if cfg.sliding_window:   # windowed self-attention is per token; the core sees the document
    return no_attention + n_self * attn * cfg.sliding_window, c.loops * attn
  return no_attention, (n_self + c.loops) * attn
