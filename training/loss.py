"""Next-token cross-entropy, summed (not averaged) so micro-batches and devices add up exactly.

With `attention.loss_chunk` > 0 (or -1, automatic: once the logits pass `LOGITS_BUDGET`) the
LM head and the loss run over sequence chunks under
`jax.checkpoint` inside a scan, so the [tokens, vocab] logits exist one chunk at a time in
the forward pass and are recomputed chunk by chunk in the backward pass: memory grows as
chunk x vocab, not length x vocab.
"""

import logging

import jax
import jax.numpy as jnp

from modeling.scopes import LOSS_SCOPE

log = logging.getLogger('loomax')

LOGITS_BUDGET = 1 << 30  # bytes of float32 [tokens, vocab] logits before loss_chunk=-1 chunks
AUTO_CHUNK_BYTES = 1 << 28  # the chunk it then picks: the longest whose logits fit this


def auto_chunk(batch: int, length: int, vocab: int) -> int:
  """attention.loss_chunk=-1: 0 (no chunking) while batch x length x vocab float32 logits fit
  LOGITS_BUDGET, else the longest divisor of `length` whose chunk logits fit AUTO_CHUNK_BYTES."""
  if 4 * batch * length * vocab <= LOGITS_BUDGET:
    return 0
  fits = [c for c in range(1, length + 1) if length % c == 0 and 4 * batch * c * vocab
          <= AUTO_CHUNK_BYTES]
  return max(fits) if fits else 1


def cross_entropy_sum(logits_BLV: jax.Array, targets_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of -log p(target), number of counted tokens); targets < 0 are not counted."""
  logits = logits_BLV.astype(jnp.float32)
  valid = targets_BL >= 0
  safe = jnp.where(valid, targets_BL, 0)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  nll = jnp.where(valid, lse - target_logit, 0.0)
  return nll.sum(), valid.sum().astype(jnp.float32)


def chunked_cross_entropy_sum(h_BLD: jax.Array, head_DV: jax.Array, targets_BL: jax.Array,
                              chunk: int) -> tuple[jax.Array, jax.Array]:
  """`cross_entropy_sum(h @ head, targets)` computed `chunk` tokens per row at a time."""
  B, L, D = h_BLD.shape
  if L % chunk:
    raise ValueError(f'attention.loss_chunk={chunk} does not divide the sequence length {L}')
  n = L // chunk
  # Chunk t holds tokens t, t + n, t + 2n, ...: strided, so when the sequence is sharded over
  # the context axis every chunk stays spread over all its devices.
  h_NBCD = h_BLD.reshape(B, chunk, n, D).transpose(2, 0, 1, 3)
  targets_NBC = targets_BL.reshape(B, chunk, n).transpose(2, 0, 1)

  @jax.checkpoint  # keep only the chunk's inputs; recompute its logits in the backward pass
  def chunk_loss(h_BCD, targets_BC):
    return cross_entropy_sum(h_BCD @ head_DV.astype(h_BCD.dtype), targets_BC)

  def body(carry, xs):
    total, count = chunk_loss(*xs)
    return (carry[0] + total, carry[1] + count), None

  (total, count), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(())), (h_NBCD, targets_NBC))
  return total, count


def lm_loss_sum(model, h_BLD: jax.Array, targets_BL: jax.Array, *, chunk: int = 0):
  """The LM head and the loss together; `chunk` > 0 (attention.loss_chunk) chunks both,
  -1 picks the chunk from the logits' size (`auto_chunk`, logged)."""
  with jax.named_scope(LOSS_SCOPE):
    return _lm_loss_sum(model, h_BLD, targets_BL, chunk)


def _lm_loss_sum(model, h_BLD, targets_BL, chunk):
  if chunk < 0:
    B, L = targets_BL.shape
    chunk = auto_chunk(B, L, model.head_matrix().shape[-1])
    log.info('attention.loss_chunk=-1 -> %d (batch %d x %d tokens x vocab %d)', chunk, B, L,
             model.head_matrix().shape[-1])
  if chunk and chunk < h_BLD.shape[1]:
    return chunked_cross_entropy_sum(h_BLD, model.head_matrix(), targets_BL, chunk)
  return cross_entropy_sum(model.logits(h_BLD), targets_BL)
