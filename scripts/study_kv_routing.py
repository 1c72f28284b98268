"""Study: stochastic KV routing, seeded, in absolute held-out loss at 100/50/25% cache
retention, against the baselines the paper uses.

    python scripts/study_kv_routing.py              # 3 seeds -> docs/results/kv_routing.md
    python scripts/study_kv_routing.py --smoke      # 2 seeds, 3 steps, to a temp folder

"Stochastic KV Routing: Enabling Adaptive Depth-Wise Cache Sharing" (Filippova et al., 2026).
Arms, all trained on the same tokens per seed: the 4-layer dense model trained with routing
(p = 0.6) and without (p = 1), both evaluated with every g-th layer keeping a cache (g = 1, 2, 4:
100/50/25% retention); a shallower full-cache model with the same cache as 50% (2 layers) and
25% (1 layer); and fixed cross-layer sharing every 2 layers, trained and evaluated under that
plan (CLA-style). Claims (absolute loss, not each model's increase over its own full cache):
routed < baseline at each retention; routed at 50% < the 2-layer model and < fixed sharing.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS = 600
P_ROUTED = 0.6
GROUPS = {'100%': 1, '50%': 2, '25%': 4}

BUDGET = """Budget: configs/tiny.py dense model at d={m.d_model} ({m.num_layers} layers,
{m.num_heads} heads x {m.head_dim}, byte vocabulary), seq {c.seq_len}, batch {c.batch_size},
{c.steps} steps (= {tokens:,} tokens per run), lr {c.optimizer.lr:g} cosine with
{c.optimizer.warmup_steps} warm-up steps, routed p = {p}; the same data order per seed in every
arm; held-out set: {c.eval_batches} batches, the same for every run."""
WHY = """Sized by FLOP count (an estimate; the wall times above are the measurement) for
about 30-40 minutes of a quiet 2-core CPU for 5 arms x 3 seeds (the shallow arms are cheap)."""


def register_fixed_sharing():
  """Registers model.name='transformer_cla': the dense model that follows its configured cache
  plan (model.kv_routing.cache_every) in training too, i.e. fixed cross-layer KV sharing."""
  import dataclasses

  from modeling import registry, transformer
  from modeling.kv_routing import CachePlan

  if 'transformer_cla' in registry.FAMILIES:
    return

  class FixedSharing(transformer.Transformer):
    def __call__(self, tokens_BL, *, segment_ids, positions, rng=None, kv_plan=None,
                 attn_plan=None):
      return super().__call__(tokens_BL, segment_ids=segment_ids, positions=positions, rng=rng,
                              kv_plan=kv_plan or CachePlan.from_config(self.cfg),
                              attn_plan=attn_plan)

  registry.FAMILIES['transformer_cla'] = dataclasses.replace(registry.FAMILIES['transformer'],
                                                             build=FixedSharing)


def _base(smoke: bool, steps: int):
  from configs import tiny

  def base():
    c = tiny.get_config()
    c.steps, c.batch_size, c.seq_len, c.eval_batches = steps, 16, 128, 8
    c.optimizer.warmup_steps = max(1, steps // 10)
    c.log_every = max(1, steps // 10)
    c.perf.peak_trials = 1            # studies report no MFU: one start-up matmul timing
    m = c.model
    m.d_model, m.head_dim, m.mlp_dim = 128, 128 // m.num_heads, 384
    if smoke:
      c.batch_size, c.seq_len, c.eval_batches = 8, 32, 1
      m.d_model, m.head_dim, m.mlp_dim = 32, 32 // m.num_heads, 96
    return c
  return base


def check(arm, config, model):
  """The mechanism is on: the routed arm draws routes that borrow K/V in training, and its
  50% / 25% evaluations share caches; the CLA arm trains under a shared plan."""
  import jax

  from modeling import kv_routing
  kv = config.model.kv_routing
  if arm.name == 'routed':
    assert kv.p < 1, f'{arm.name}: model.kv_routing.p={kv.p} routes nothing'
    borrowed = 0
    for i in range(8):
      routes = kv_routing.layer_routes(config.model, jax.random.PRNGKey(i))
      assert routes is not None, 'training draws no routes'
      borrowed += sum(int(s) != l for l, s in enumerate(routes.sources))
    assert borrowed > 0, 'no layer borrowed K/V in 8 draws'
  if arm.evals:
    for name, kw in arm.evals.items():
      assert kw['kv_plan'].is_full == (name == '100%'), (arm.name, name)
  if arm.name == 'fixed_k2':
    assert not kv_routing.CachePlan.from_config(config.model).is_full


def make_study(smoke: bool = False, steps: int | None = None):
  from modeling.kv_routing import CachePlan
  from training.evaluation.study import Arm, Comparison, Study
  register_fixed_sharing()
  steps = steps or (3 if smoke else STEPS)
  base = _base(smoke, steps)
  L = base().model.num_layers
  plans = {name: {'kv_plan': CachePlan.every(L, g)} for name, g in GROUPS.items()}
  arms = [Arm('routed', {'model.kv_routing.p': P_ROUTED}, f'routed p={P_ROUTED}', evals=plans),
          Arm('baseline', {}, 'baseline p=1', evals=plans),
          Arm('shallow_2', {'model.num_layers': L // 2}, f'{L // 2} layers, full cache'),
          Arm('shallow_1', {'model.num_layers': L // 4}, f'{L // 4} layer, full cache'),
          Arm('fixed_k2', {'model.name': 'transformer_cla', 'model.kv_routing.cache_every': 2},
              'fixed sharing every 2 layers')]
  if smoke:   # fewer compiles: one shallow arm
    arms = [a for a in arms if a.name != 'shallow_1']
  comparisons = [Comparison(f'routed@{r}', f'baseline@{r}', f'routed beats baseline at {r}')
                 for r in GROUPS]
  comparisons += [
      Comparison('routed@50%', 'shallow_2', 'routed at 50% beats a 2-layer full-cache model'),
      Comparison('routed@50%', 'fixed_k2', 'routed at 50% beats fixed sharing every 2 layers')]
  if not smoke:
    comparisons.append(Comparison('routed@25%', 'shallow_1',
                                  'routed at 25% beats a 1-layer full-cache model'))
  c = base()
  return Study('kv_routing', 'Stochastic KV routing: absolute loss under cache sharing', base,
               arms, comparisons,
               budget=BUDGET.format(c=c, m=c.model, p=P_ROUTED,
                                    tokens=steps * c.batch_size * c.seq_len),
               why=WHY, check=check, smoke=smoke)


if __name__ == '__main__':
  from scripts import study
  sys.exit(study.main(name='kv_routing'))
