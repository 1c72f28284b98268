"""Autoregressive sampling with a cache, for every model family.

One loop, every family's cache layout behind `Decoder`, which the family's registry entry
makes (`modeling/registry.py`): the dense transformer under a KV cache plan
(modeling/decode.py), CART with prelude/anchor/coda caches and R chosen at inference
(modeling/cart_decode.py), SambaY with its constant-size self-decoder state and one shared
KV cache (modeling/sambay_decode.py). Prefill runs as one compiled call and the decoding steps
as one compiled `lax.scan`; both are compiled ahead of time so timings exclude compilation.

Batched sampling: every row shares the prompt length (rows may hold different prompts of that
length), since every family's decoder keeps all rows at one position.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from modeling import registry
from modeling.decode import Decoder
from modeling.kv_routing import CachePlan


@dataclasses.dataclass(frozen=True)
class Sampler:
  """temperature 0 is greedy (arg-max); top_k 0 and top_p 1 switch those filters off."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f'--temperature={self.temperature}; must be >= 0 (0 = greedy)')
    if self.top_k < 0:
      raise ValueError(f'--top_k={self.top_k}; must be >= 0 (0 = off)')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'--top_p={self.top_p}; must lie in (0, 1] (1 = off)')

  def __call__(self, logits_BV: jax.Array, rng: jax.Array) -> jax.Array:
    """int32 [B]: the next token of every row."""
    logits_BV = logits_BV.astype(jnp.float32)
    if self.temperature == 0:
      return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / self.temperature
    if self.top_k and self.top_k < logits_BV.shape[-1]:
      kth_B1 = jax.lax.top_k(logits_BV, self.top_k)[0][:, -1:]
      logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if self.top_p < 1.0:
      # Keep the smallest set of most likely tokens whose probability reaches top_p.
      sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
      probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
      before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV   # mass of strictly likelier tokens
      keep = jnp.maximum(jnp.sum(before_BV < self.top_p, axis=-1), 1)
      cutoff_B1 = jnp.take_along_axis(sorted_BV, (keep - 1)[:, None], axis=-1)
      logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def decoder_for(model: nnx.Module, *, loops: int | None = None,
                plan: CachePlan | None = None) -> Decoder:
  """The decoder of `model`'s family (its registry entry's cache protocol). `plan` (dense only;
  default: the config's model.kv_routing plan) says which layers keep a cache; `loops` (CART
  only) is R."""
  family = registry.get_family(model.cfg.name)
  if family.decoder is None:
    raise ValueError(f'model.name={model.cfg.name!r} has no decoder (registry entry)')
  return family.decoder(model, loops=loops, plan=plan)


def cache_bytes(cache) -> int:
  """Bytes of every array of a cache with more than one element (scalar counters excluded)."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache) if x.ndim > 0))


@dataclasses.dataclass
class Generation:
  tokens: np.ndarray        # int32 [B, max_new_tokens]
  prefill_s: float          # seconds of the compiled prefill (compilation excluded)
  decode_s: float           # seconds of the compiled decoding scan
  prompt_tokens: int        # B x P
  decoded_tokens: int       # B x (max_new_tokens - 1): tokens produced by decoding steps
  cache_bytes: int

  @property
  def prefill_tokens_per_s(self) -> float:
    return self.prompt_tokens / self.prefill_s if self.prefill_s else float('nan')

  @property
  def decode_tokens_per_s(self) -> float:
    return self.decoded_tokens / self.decode_s if self.decode_s else float('nan')


def compile_generate(model: nnx.Module, decoder: Decoder, batch: int, prompt_len: int,
                     max_new_tokens: int, sampler: Sampler, *, extra_slots: int = 0):
  """AOT-compiled (prefill, decode) for these shapes: prefill(state, prompt, rng) -> (first
  token, cache), decode(state, cache, token, rng) -> (tokens [B, N-1], cache).

  The cache holds prompt_len + max_new_tokens (+ extra_slots) positions.
  """
  if max_new_tokens < 1:
    raise ValueError(f'--max_new_tokens={max_new_tokens}; must be >= 1')
  graphdef, state = nnx.split(model)
  max_len = prompt_len + max_new_tokens + extra_slots

  def prefill(state, prompt_BP, rng):
    logits_BV, cache = decoder.prefill(nnx.merge(graphdef, state), prompt_BP, max_len)
    return sampler(logits_BV, jax.random.fold_in(rng, 0)), cache

  def run_decode(state, cache, token_B, rng):
    m = nnx.merge(graphdef, state)

    def body(carry, i):
      cache, token_B = carry
      logits_BV, cache = decoder.step(m, cache, token_B)
      nxt = sampler(logits_BV, jax.random.fold_in(rng, i))
      return (cache, nxt), nxt

    (cache, _), tokens_NB = jax.lax.scan(body, (cache, token_B),
                                         jnp.arange(1, max_new_tokens, dtype=jnp.int32))
    return tokens_NB.T, cache

  prompt = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
  prefill_c = jax.jit(prefill).lower(state, prompt, rng).compile()
  token, cache = jax.eval_shape(prefill, state, prompt, rng)
  decode_c = jax.jit(run_decode, donate_argnums=1).lower(state, cache, token, rng).compile()
  return state, prefill_c, decode_c


def generate(model: nnx.Module, prompt_BP, max_new_tokens: int, sampler: Sampler = Sampler(),
             *, seed: int = 0, loops: int | None = None, plan: CachePlan | None = None,
             decoder: Decoder | None = None) -> Generation:
  """Samples `max_new_tokens` tokens after each row of `prompt_BP` (int [B, P])."""
  prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
  if prompt_BP.ndim != 2 or prompt_BP.shape[1] < 1:
    raise ValueError(f'prompt must be [batch, length >= 1] tokens; got shape {prompt_BP.shape}')
  B, P = prompt_BP.shape
  decoder = decoder or decoder_for(model, loops=loops, plan=plan)
  state, prefill_c, decode_c = compile_generate(model, decoder, B, P, max_new_tokens, sampler)
  rng = jax.random.PRNGKey(seed)
  t0 = time.perf_counter()
  first_B, cache = jax.block_until_ready(prefill_c(state, prompt_BP, rng))
  t1 = time.perf_counter()
  nbytes = cache_bytes(cache)
  rest_BN, cache = jax.block_until_ready(decode_c(state, cache, first_B, rng))
  t2 = time.perf_counter()
  tokens = np.concatenate([np.asarray(first_B)[:, None], np.asarray(rest_BN)], axis=1)
  return Generation(tokens=tokens, prefill_s=t1 - t0, decode_s=t2 - t1, prompt_tokens=B * P,
                    decoded_tokens=B * (max_new_tokens - 1), cache_bytes=nbytes)
