"""AdamW with warmup + cosine or warmup-stable-decay schedules, clipping and a decay mask.

The learning-rate curve depends on `optimizer.*` keys only: `warmup_steps` is used as given
(never capped by `steps`), and the schedule's length is `optimizer.decay_steps`. Its default 0
means "the run's `steps`", resolved once at the run's first start and recorded in the
checkpoint, so a resume with another `steps` keeps the curve (training/checkpointing.py).
"""

from typing import Any

import jax
import ml_collections
import optax

from modeling import axes as ax


def schedule_steps(opt: ml_collections.ConfigDict, run_steps: int) -> int:
  """The schedule's length: optimizer.decay_steps, or `run_steps` when that is 0."""
  return int(opt.decay_steps) if opt.get('decay_steps', 0) > 0 else int(run_steps)


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """The schedule over `total_steps` (see schedule_steps); warm-up is optimizer.warmup_steps."""
  warmup = int(opt.warmup_steps)
  final = opt.lr * opt.min_lr_ratio
  if opt.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, opt.lr, warmup, max(total_steps, warmup + 1),
                                              end_value=final)
  if opt.schedule == 'wsd':
    # Warmup-stable-decay (Hu et al., 2024): flat at peak, then linear decay at the end.
    decay = max(1, int(round(opt.decay_fraction * total_steps)))
    stable = max(0, total_steps - warmup - decay)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, opt.lr, warmup), optax.constant_schedule(opt.lr),
         optax.linear_schedule(opt.lr, final, decay)], [warmup, warmup + stable])
  if opt.schedule == 'constant':
    return optax.join_schedules([optax.linear_schedule(0.0, opt.lr, warmup),
                                 optax.constant_schedule(opt.lr)], [warmup])
  raise ValueError(f'optimizer.schedule={opt.schedule!r}; valid: cosine, wsd, constant')


def decay_mask(param_axes: Any, decay_norms_and_biases: bool) -> Any:
  """Decay matrices only: a parameter with fewer than two non-layer axes is a norm or bias."""
  def is_matrix(axes):
    return decay_norms_and_biases or len([a for a in axes if a != ax.LAYERS]) >= 2
  return jax.tree.map(is_matrix, param_axes, is_leaf=lambda x: isinstance(x, tuple))


def make_optimizer(opt: ml_collections.ConfigDict, run_steps: int, param_axes: Any):
  schedule = learning_rate_schedule(opt, schedule_steps(opt, run_steps))
  parts = []
  if opt.clip_norm:
    parts.append(optax.clip_by_global_norm(opt.clip_norm))
  parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay,
                           mask=decay_mask(param_axes, opt.decay_norms_and_biases)))
  return optax.chain(*parts), schedule
