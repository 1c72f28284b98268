"""Next-token cross-entropy, summed (not averaged) so micro-batches and devices add up exactly."""

import jax
import jax.numpy as jnp


def cross_entropy_sum(logits_BLV: jax.Array, targets_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of -log p(target), number of counted tokens); targets < 0 are not counted."""
  logits = logits_BLV.astype(jnp.float32)
  valid = targets_BL >= 0
  safe = jnp.where(valid, targets_BL, 0)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  nll = jnp.where(valid, lse - target_logit, 0.0)
  return nll.sum(), valid.sum().astype(jnp.float32)


def lm_loss_sum(model, h_BLD: jax.Array, targets_BL: jax.Array):
  """The LM head and the loss together: the place a chunked head slots in."""
  return cross_entropy_sum(model.logits(h_BLD), targets_BL)
