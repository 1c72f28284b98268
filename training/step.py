"""The pure train and eval steps: (state, batch) -> (state, metrics)."""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from modeling.scopes import OPTIMIZER_SCOPE
from parallelism import disaggregation
from training import loss as loss_lib
from training.state import ModelSetup, TrainState

Batch = dict[str, jax.Array]


def model_inputs(batch: Batch) -> dict[str, Any]:
  """The model call's per-token and per-batch inputs besides the tokens: segment ids,
  positions, and the batch's attention plan (disaggregation's 'dca_*' arrays, or None), a step
  input the model passes down to every attend call."""
  return dict(segment_ids=batch['segment_ids'], positions=batch['positions'],
              attn_plan=disaggregation.plan_of(batch))


def loss_sum(params, graphdef, batch: Batch, rng,
             loss_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  model = nnx.merge(graphdef, params)
  h_BLD = model(batch['inputs'], rng=rng, **model_inputs(batch))
  return loss_lib.lm_loss_sum(model, h_BLD, batch['targets'], chunk=loss_chunk)


def _accumulated_grads(params, graphdef, batch: Batch, rng, accum_steps: int, constrain_micro,
                       loss_chunk: int = 0):
  """Sum of loss and gradients over micro-batches; rows i*A + a form micro-batch a, so each
  micro-batch draws evenly from every data-parallel shard."""
  grad_fn = jax.value_and_grad(functools.partial(loss_sum, loss_chunk=loss_chunk), has_aux=True)
  if accum_steps == 1:
    (total, count), grads = grad_fn(params, graphdef, batch, rng)
    return total, count, grads

  def split(x):
    b = x.shape[0]
    if b % accum_steps:
      raise ValueError(f'batch rows {b} not divisible by optimizer.grad_accum_steps={accum_steps}')
    return jnp.swapaxes(x.reshape(b // accum_steps, accum_steps, *x.shape[1:]), 0, 1)

  micro = jax.tree.map(split, batch)

  def body(carry, xs):
    i, mb = xs
    total, count, grads = carry
    mb = jax.tree.map(constrain_micro, mb)
    # Every micro-batch draws with the step's key: stochastic layers (KV routing's routes,
    # CART's loop count) then take the same draws however the batch is split.
    (t, c), g = grad_fn(params, graphdef, mb, rng)
    return (total + t, count + c, jax.tree.map(jnp.add, grads, g)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (total, count, grads), _ = jax.lax.scan(
      body, (jnp.zeros(()), jnp.zeros(()), zeros), (jnp.arange(accum_steps), micro))
  return total, count, grads


def apply_gradients(setup: ModelSetup, state: TrainState, total, count,
                    grads) -> tuple[TrainState, dict[str, Any]]:
  """The update from summed loss, token count and gradients (shared with hybrid_dp)."""
  with jax.named_scope(OPTIMIZER_SCOPE):
    return _apply_gradients(setup, state, total, count, grads)


def _apply_gradients(setup, state, total, count, grads):
  graphdef, tx, schedule = setup.graphdef, setup.tx, setup.schedule
  # Normalise by the global token count, so every split of the batch gives the same step.
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  loss, grad_norm = total / denom, optax.tree.norm(grads)
  if setup.skip_nonfinite:
    # Keep the old parameters and optimizer state (its step count too) when anything about the
    # update is not finite; the step counter and the data still advance.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
    keep = lambda new, old: jnp.where(ok, new, old)
    params = jax.tree.map(keep, params, state.params)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state)
  metrics = {
      'loss': loss,
      'tokens': count,
      'grad_norm': grad_norm,
      'param_norm': optax.tree.norm(params),
      'lr': schedule(state.step),
  }
  if setup.skip_nonfinite:
    metrics['skipped'] = 1 - ok.astype(jnp.int32)
  model = nnx.merge(graphdef, params)
  if hasattr(model, 'diagnostics'):
    metrics.update(model.diagnostics())
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(setup: ModelSetup, accum_steps: int = 1,
                    constrain_micro: Callable = lambda x: x, loss_chunk: int = 0):
  graphdef = setup.graphdef

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
    rng = jax.random.fold_in(state.rng, state.step)
    total, count, grads = _accumulated_grads(state.params, graphdef, batch, rng, accum_steps,
                                             constrain_micro, loss_chunk)
    state, metrics = apply_gradients(setup, state, total, count, grads)
    if 'target_bytes' in batch:  # bytes of text per target (training/data): nats -> bits/byte
      nbytes = jnp.maximum(jnp.sum(batch['target_bytes']).astype(jnp.float32), 1.0)
      metrics['train/bits_per_byte'] = total / (nbytes * jnp.log(2.0))
    return state, metrics

  return train_step


def make_eval_step(setup: ModelSetup, loss_chunk: int = 0):
  graphdef = setup.graphdef

  def eval_step(params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    return loss_sum(params, graphdef, batch, None, loss_chunk)

  return eval_step
