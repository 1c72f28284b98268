"""What one train step of a configured model does, family-agnostic: parameters, FLOPs per
token (from the family's own counter in the registry) and the activation footprint.

Activations are modelled per *effective layer*: the layers a token passes through, counted as
dense-layer equivalents from the family's FLOP counter,
    effective_layers = (forward FLOPs per token at length 1 / 2 - d_model x vocab) / P_layer,
with P_layer = d x Dh x (2H + 2K) + 3 d F the matmul parameters of one dense GQA layer. A looped
core (CART) counts once per application, as its activations are kept once per application.
Recurrence scans (SambaY's Mamba layers) run far below matmul speed, so their FLOPs are a term
of their own (`scan_flops`, from the family registry's `recurrence_flops`).
"""

import dataclasses
import math

import jax
import ml_collections
from flax import nnx

from modeling import registry

ITEMSIZE = {'float32': 4, 'bfloat16': 2, 'float16': 2}


@dataclasses.dataclass(frozen=True)
class Workload:
  params: int                 # stored parameters
  stored_layers: int          # distinct layer modules (fsdp gathers one at a time)
  effective_layers: float     # dense-layer equivalents a token passes through (see above)
  matmul_flops: float         # forward FLOPs per token without attention or scans (length 1)
  scan_flops: float           # forward FLOPs per token in recurrence scans (registry)
  attention_flops: float      # forward attention FLOPs per token at seq_len (causal)
  d_model: int
  heads: int
  kv_heads: int
  head_dim: int
  mlp_dim: int
  vocab: int
  seq_len: int
  global_tokens: int          # tokens per optimizer step
  param_bytes: int            # itemsize of parameters
  act_bytes: int              # itemsize of activations

  @property
  def rows(self) -> int:
    return self.global_tokens // self.seq_len

  @property
  def train_flops_per_token(self) -> float:
    return 3.0 * (self.matmul_flops + self.scan_flops + self.attention_flops)


def count_params(model_config: ml_collections.ConfigDict) -> int:
  """Stored parameters of the configured model, from an abstract build (no memory)."""
  model = nnx.eval_shape(lambda: registry.build_model(model_config, rngs=nnx.Rngs(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def from_config(config: ml_collections.ConfigDict, seq_len: int, global_tokens: int,
                params: int | None = None) -> Workload:
  m = config.model
  fam = registry.get_family(m.name)
  fwd_1 = fam.forward_flops_per_token(m, 1)
  fwd_l = fam.forward_flops_per_token(m, seq_len)
  D, H, K, Dh, F, V = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim, m.vocab_size
  per_layer = D * Dh * (2 * H + 2 * K) + 3 * D * F
  effective = max((fwd_1 / 2 - D * V) / per_layer, 1.0)
  scan = fam.recurrence_flops(m) if fam.recurrence_flops else 0.0
  if global_tokens % seq_len:
    raise ValueError(f'--global_batch_tokens={global_tokens} is not a multiple of '
                     f'--seq_len={seq_len}')
  return Workload(
      params=count_params(m) if params is None else params,
      stored_layers=int(m.num_layers), effective_layers=effective, matmul_flops=fwd_1 - scan,
      scan_flops=scan,
      attention_flops=max(fwd_l - fwd_1, 0.0), d_model=D, heads=H, kv_heads=K, head_dim=Dh,
      mlp_dim=F, vocab=V, seq_len=seq_len, global_tokens=global_tokens,
      param_bytes=ITEMSIZE[m.param_dtype], act_bytes=ITEMSIZE[m.dtype])
