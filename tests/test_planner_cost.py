"""Per-family planner costs (registry `planner_cost`): (per token, per causal pair) forward FLOPs
whose document total linear x s + pair x s(s+1)/2 matches each family's FLOP counter, where a
dense formula (every layer a GQA self-attention layer) does not (CART's R core attentions,
SambaY's layer kinds). The hybrid-DP planner's `CostModel.for_model` takes them from there."""

import numpy as np
import pytest

from configs import base, cart_tiny, sambay_tiny
from modeling import registry
from parallelism.hybrid import planner as hybrid_dp
from parallelism.hybrid.planner import CostModel


def _configs():
  dense = base.get_config().model
  windowed = base.get_config().model
  windowed.sliding_window = 256
  routed = base.get_config().model   # stochastic KV routing: the transformer family's counter
  routed.kv_routing.p = 0.5
  cart = cart_tiny.get_config('6').model
  cart_gqa = cart_tiny.get_config('4').model
  cart_gqa.cart.prelude_attention = cart_gqa.cart.coda_attention = 'gqa'
  sambay = sambay_tiny.get_config().model
  sambay.num_layers = 12
  return {'dense': dense, 'dense_window': windowed, 'dense_kv_routing': routed, 'cart': cart,
          'cart_gqa': cart_gqa, 'sambay': sambay}


def _dense_formula(cfg) -> CostModel:
  """What CostModel.for_model computed before it asked the registry: num_layers dense GQA
  self-attention layers whatever the family, x3 for forward + backward."""
  D, H, K, Dh, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  per_layer = D * Dh * (H + 2 * K) + H * Dh * D + 3 * D * F
  matmul = cfg.num_layers * per_layer + D * cfg.vocab_size
  return CostModel(linear=3 * 2.0 * matmul, pair=3 * 4.0 * H * Dh * cfg.num_layers)


@pytest.mark.parametrize('name', list(_configs()))
@pytest.mark.parametrize('s', [2048, 8192])
def test_planner_cost_matches_the_flop_counter(name, s):
  cfg = _configs()[name]
  family = registry.get_family(cfg.name)
  linear, pair = family.planner_cost(cfg)
  modelled = linear * s + pair * s * (s + 1) / 2
  counted = family.forward_flops_per_token(cfg, s) * s
  assert modelled == pytest.approx(counted, rel=0.01), (name, modelled / counted)


@pytest.mark.parametrize('name', list(_configs()))
@pytest.mark.parametrize('s', [2048, 8192])
def test_the_hybrid_dp_cost_is_the_family_counter(name, s):
  """CostModel.for_model: a document's training FLOPs are 3 x the family's forward count."""
  cfg = _configs()[name]
  counted = registry.get_family(cfg.name).forward_flops_per_token(cfg, s) * s
  assert CostModel.for_model(cfg).doc(s) == pytest.approx(3 * counted, rel=0.01), name


def test_the_dense_formula_misses_cart_and_sambay():
  """Why the planner asks the registry: the dense formula is off by more than 10% on both."""
  s = 8192
  for name in ('cart', 'sambay'):
    cfg = _configs()[name]
    exact = CostModel.for_model(cfg).doc(s)
    assert abs(_dense_formula(cfg).doc(s) / exact - 1) > 0.1, name
  dense = _configs()['dense']
  assert CostModel.for_model(dense) == pytest.approx(_dense_formula(dense))


def test_cart_core_cost_grows_with_the_loops():
  """Each core application adds the same cost: doc(s) is affine in cart.loops, and each loop
  adds one causal cross-attention (4 H Dh per pair, x3) to the pair cost."""
  s = 4096
  costs = {r: CostModel.for_model(cart_tiny.get_config(str(r)).model) for r in (2, 4, 8)}
  per_loop = (costs[4].doc(s) - costs[2].doc(s)) / 2
  assert per_loop > 0
  assert costs[8].doc(s) - costs[4].doc(s) == pytest.approx(4 * per_loop, rel=1e-9)
  m = cart_tiny.get_config('2').model
  assert costs[8].pair - costs[2].pair == pytest.approx(6 * 3 * 4.0 * m.num_heads * m.head_dim)
  assert costs[8].linear > costs[2].linear   # the core's projections and MLP, per token


@pytest.mark.parametrize('name', ['cart', 'sambay'])
def test_a_plan_costs_what_the_family_counts(name):
  """A hybrid-DP plan's modelled FLOPs (every member of every group, over the step) sum to the
  family's count of its documents, not to the dense formula's."""
  cfg = _configs()[name]
  family = registry.get_family(cfg.name)
  lengths = np.array([4096, 1500, 900, 700, 300, 256, 128, 2000])
  cost = CostModel.for_model(cfg)
  p = hybrid_dp.plan(lengths, 4, 1024, layouts=(1, 2, 4), cost=cost)
  counted = 3 * sum(family.forward_flops_per_token(cfg, int(s)) * int(s) for s in lengths)
  dense = sum(_dense_formula(cfg).doc(int(s)) for s in lengths)
  assert p.device_cost.sum() == pytest.approx(counted, rel=0.01)
  assert abs(p.device_cost.sum() / dense - 1) > 0.1


def test_a_family_without_planner_cost_is_refused(monkeypatch):
  import dataclasses
  cfg = _configs()['dense']
  bare = dataclasses.replace(registry.FAMILIES['transformer'], planner_cost=None)
  monkeypatch.setitem(registry.FAMILIES, 'transformer', bare)
  with pytest.raises(ValueError, match='planner_cost'):
    CostModel.for_model(cfg)
