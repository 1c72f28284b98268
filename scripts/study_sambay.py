"""Study: SambaY vs a YOCO-style model without GMU vs a dense transformer at matched parameters,
seeded.

    python scripts/study_sambay.py                  # 3 seeds -> docs/results/sambay.md
    python scripts/study_sambay.py --smoke          # 2 seeds, 3 steps, to a temp folder

"Decoder-Hybrid-Decoder Architecture for Efficient Reasoning with Long Generation" (Ren et al.,
2025) reports lower loss for SambaY than for YOCO (the same decoder-decoder with every GMU layer
replaced by cross-attention). The SambaY model has 8 layers, the smallest depth with every role
(Mamba/SWA self-decoder, memory Mamba, shared-KV full attention, GMU and cross-attention), so it
holds GMU layers; the YOCO model swaps each for a cross-attention layer (a GMU is 2 x d x 2d, a
cross-attention 2 x d x H x Dh); the dense depth is the one whose count is nearest SambaY's.
Claims tested (training/evaluation/study.py): SambaY < YOCO without GMU; SambaY < dense.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS = 600

BUDGET = """Budget: configs/sambay_tiny.py at d={m.d_model} ({m.num_layers} layers, window
{m.sambay.window}, byte vocabulary, NoPE), seq {c.seq_len}, batch {c.batch_size}, {c.steps} steps
(= {tokens:,} tokens per run), lr {c.optimizer.lr:g} cosine with {c.optimizer.warmup_steps}
warm-up steps, the same data order per seed in every arm; held-out set: {c.eval_batches}
batches, the same for every run."""
WHY = """Sized by FLOP count (an estimate; the wall times above are the measurement) for
about 30-40 minutes of a quiet 2-core CPU for 3 arms x 3 seeds; at 8 layers two of the
cross-decoder's layers are GMUs."""


def register_yoco():
  """Registers model.name='sambay_yoco': SambaY with every GMU layer a cross-attention layer."""
  from flax import nnx

  from modeling import registry, sambay as sb, ssm

  if 'sambay_yoco' in registry.FAMILIES:
    return

  class YocoNoGmu(sb.SambaY):
    """SambaY's layout with every GMU layer replaced by a cross-attention layer over the shared
    KV cache: the YOCO cross-decoder the paper compares against."""

    def __init__(self, cfg, *, rngs, runtime=sb._SINGLE_DEVICE, scan_fn=None):
      super().__init__(cfg, rngs=rngs, runtime=runtime, scan_fn=scan_fn)
      recurrence = runtime.recurrence or ssm.LocalRecurrence(
          scan_fn or ssm.make_scan(cfg.sambay.scan_impl, cfg.sambay.scan_chunk))
      self.roles = tuple(sb.CROSS if r == sb.GMU_ROLE else r for r in self.roles)
      self.layers = nnx.List([
          sb.Layer(sb.CROSS, cfg, rngs=rngs, runtime=runtime, recurrence=recurrence)
          if layer.role == sb.GMU_ROLE else layer for layer in self.layers])

  # SambaY's entry (FLOPs, order-dependent layers, hooks) with this builder.
  registry.FAMILIES['sambay_yoco'] = dataclasses.replace(registry.FAMILIES['sambay'],
                                                         build=YocoNoGmu)


def _base(smoke: bool, steps: int):
  from configs import sambay_tiny

  def base():
    c = sambay_tiny.get_config()
    c.steps, c.batch_size, c.seq_len, c.eval_batches = steps, 8, 128, 8
    c.optimizer.warmup_steps = max(1, steps // 10)
    c.log_every = max(1, steps // 10)
    c.perf.peak_trials = 1            # studies report no MFU: one start-up matmul timing
    if smoke:
      c.seq_len, c.eval_batches = 32, 1
      c.model.update(num_layers=8, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16,
                     mlp_dim=64)
      c.model.sambay.window = 16
    return c
  return base


def dense_layers(base) -> int:
  from training.evaluation import study as study_lib
  target = study_lib.parameter_counts(base().model)[0]
  best = None
  for layers in range(1, 17):
    c = base()
    c.model.update(name='transformer', num_layers=layers, rope_theta=10_000.0)
    n = study_lib.parameter_counts(c.model)[0]
    if best is None or abs(n - target) < abs(best[1] - target):
      best = (layers, n)
  return best[0]


def check(arm, config, model):
  """The mechanism is on: SambaY holds GMU layers; YOCO holds cross-attention in their place."""
  from modeling import sambay as sb
  if arm.name == 'sambay':
    assert sum(r == sb.GMU_ROLE for r in model.roles) >= 1, f'{arm.name}: no GMU layer'
    assert sum(layer.role == sb.GMU_ROLE for layer in model.layers) >= 1
  elif arm.name == 'yoco':
    gmus = sum(r == sb.GMU_ROLE for r in sb.layer_roles(config.model.num_layers))
    assert gmus >= 1 and not any(layer.role == sb.GMU_ROLE for layer in model.layers)
    assert sum(layer.role == sb.CROSS for layer in model.layers) == 2 * gmus


def make_study(smoke: bool = False, steps: int | None = None):
  from training.evaluation.study import Arm, Comparison, Study
  register_yoco()
  steps = steps or (3 if smoke else STEPS)
  base = _base(smoke, steps)
  layers = dense_layers(base)
  arms = [Arm('sambay', {}, 'SambaY (GMU)'),
          Arm('yoco', {'model.name': 'sambay_yoco'}, 'YOCO-style (no GMU)'),
          Arm('dense', {'model.name': 'transformer', 'model.num_layers': layers,
                        'model.rope_theta': 10_000.0}, f'dense {layers} layers')]
  comparisons = [Comparison('sambay', 'yoco', 'SambaY beats YOCO without GMU'),
                 Comparison('sambay', 'dense', 'SambaY beats parameter-matched dense')]
  c = base()
  return Study('sambay', 'SambaY vs YOCO-style (no GMU) vs dense', base, arms, comparisons,
               budget=BUDGET.format(c=c, m=c.model, tokens=steps * c.batch_size * c.seq_len),
               why=WHY, check=check, smoke=smoke)


if __name__ == '__main__':
  from scripts import study
  sys.exit(study.main(name='sambay'))
