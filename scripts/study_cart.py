"""Study: CART at R in {2, 4, 6} against the stored-matched dense transformer, seeded, with the
variable-R curve (each trained model evaluated at R'=1 and R'=2R).

    python scripts/study_cart.py                    # 3 seeds -> docs/results/cart.md
    python scripts/study_cart.py --smoke            # 2 seeds, 3 steps, to a temp folder

"CART: Context-Anchored Recurrent Transformer" (Capps, 2026) reports that CART loses to a
stored-parameter-matched dense model and that running the loop at an R' other than the
trained R hurts. Claims tested (training/evaluation/study.py: paired per-seed differences, 95% t-interval,
supported / contradicted / inconclusive at this budget): dense < CART R=6; for each trained R,
loss at R beats R'=1. The paper scale is the same study with configs/cart_d1024.py and
configs/cart_dense_stored.py as the arms' base (change `base` below).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TRAIN_LOOPS = (2, 4, 6)
STEPS = 800

BUDGET = """Budget: configs/cart_tiny.py at d={m.d_model} ({m.num_heads} heads x {m.head_dim},
MLP {m.mlp_dim}, byte vocabulary, MLA prelude P={m.cart.prelude_layers} and coda), seq {c.seq_len},
batch {c.batch_size}, {c.steps} steps (= {tokens:,} tokens per run), lr {c.optimizer.lr:g} cosine
with {c.optimizer.warmup_steps} warm-up steps, the same data order per seed in every arm;
held-out set: {c.eval_batches} batches of the corpus's held-out split, the same for every run."""
WHY = """Sized by FLOP count (an estimate; the wall times above are the measurement) for
about 30-40 minutes of a quiet 2-core CPU for 4 arms x 3 seeds, while training long enough for
the LTI gate (rho, init 0.9) to move; the dense baseline has the CART models' widths and the
depth whose stored parameter count is nearest theirs."""


def _base(smoke: bool, steps: int):
  from configs import cart_tiny

  def base():
    c = cart_tiny.get_config('2')
    c.steps, c.batch_size, c.seq_len, c.eval_batches = steps, 8, 128, 8
    c.optimizer.warmup_steps = max(1, steps // 10)
    c.log_every = max(1, steps // 10)
    c.perf.peak_trials = 1            # studies report no MFU: one start-up matmul timing
    if smoke:
      c.batch_size, c.seq_len, c.eval_batches = 8, 32, 1
      c.model.update(d_model=32, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64)
      c.model.cart.prelude_layers = 1
    return c
  return base


def dense_layers(base) -> int:
  """The dense depth whose stored parameter count is nearest CART's (tied embeddings both)."""
  from training.evaluation import study as study_lib
  target = study_lib.parameter_counts(base().model)[0]
  best = None
  for layers in range(1, 17):
    c = base()
    c.model.name, c.model.num_layers = 'transformer', layers
    n = study_lib.parameter_counts(c.model)[0]
    if best is None or abs(n - target) < abs(best[1] - target):
      best = (layers, n)
  return best[0]


def check(arm, config, model):
  """The mechanism is on: a CART arm loops R > 1 times over a shared core with its gate."""
  if config.model.name != 'cart':
    return
  assert config.model.cart.loops > 1, f'{arm.name}: R={config.model.cart.loops} is no loop'
  assert config.model.cart.shared_core and model.glue.gated, arm.name
  assert model.num_loops(training=True) == config.model.cart.loops


def make_study(smoke: bool = False, steps: int | None = None):
  from training.evaluation.study import Arm, Comparison, Study
  steps = steps or (3 if smoke else STEPS)
  loops = (2,) if smoke else TRAIN_LOOPS
  base = _base(smoke, steps)
  arms = [Arm(f'cart_r{R}', {'model.cart.loops': R}, f'CART R={R}',
              evals={"R'=1": {'loops': 1}, f"R'={min(2 * R, 16)}": {'loops': min(2 * R, 16)}})
          for R in loops]
  layers = dense_layers(base)
  arms.append(Arm('dense', {'model.name': 'transformer', 'model.num_layers': layers},
                  f'dense {layers} layers (stored-matched)'))
  top = f'cart_r{loops[-1]}'
  comparisons = [Comparison('dense', top, f'CART R={loops[-1]} loses to stored-matched dense')]
  comparisons += [Comparison(f'cart_r{R}', f"cart_r{R}@R'=1", f"trained R={R} beats R'=1")
                  for R in loops]
  c = base()
  return Study('cart', 'CART vs stored-matched dense, and inference R', base, arms, comparisons,
               budget=BUDGET.format(c=c, m=c.model, tokens=steps * c.batch_size * c.seq_len),
               why=WHY, check=check, smoke=smoke)


if __name__ == '__main__':
  from scripts import study
  sys.exit(study.main(name='cart'))
