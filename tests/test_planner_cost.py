"""Per-family planner costs (registry `planner_cost`): (per token, per causal pair) forward FLOPs
whose document total linear x s + pair x s(s+1)/2 matches each family's FLOP counter, where the
hybrid-DP planner's dense formula does not (CART's R core attentions, SambaY's layer kinds)."""

import pytest

from configs import base, cart_tiny, sambay_tiny
from modeling import registry
from parallelism.hybrid.planner import CostModel


def _configs():
  dense = base.get_config().model
  windowed = base.get_config().model
  windowed.sliding_window = 256
  cart = cart_tiny.get_config('6').model
  cart_gqa = cart_tiny.get_config('4').model
  cart_gqa.cart.prelude_attention = cart_gqa.cart.coda_attention = 'gqa'
  sambay = sambay_tiny.get_config().model
  sambay.num_layers = 12
  return {'dense': dense, 'dense_window': windowed, 'cart': cart, 'cart_gqa': cart_gqa,
          'sambay': sambay}


@pytest.mark.parametrize('name', list(_configs()))
@pytest.mark.parametrize('s', [2048, 8192])
def test_planner_cost_matches_the_flop_counter(name, s):
  cfg = _configs()[name]
  family = registry.get_family(cfg.name)
  linear, pair = family.planner_cost(cfg)
  modelled = linear * s + pair * s * (s + 1) / 2
  counted = family.forward_flops_per_token(cfg, s) * s
  assert modelled == pytest.approx(counted, rel=0.01), (name, modelled / counted)


def test_the_dense_formula_misses_cart_and_sambay():
  """What the hybrid-DP planner uses today (CostModel.for_model) against the family's cost."""
  s = 8192
  for name in ('cart', 'sambay'):
    cfg = _configs()[name]
    family = registry.get_family(cfg.name)
    linear, pair = family.planner_cost(cfg)
    exact = CostModel(linear=3 * linear, pair=3 * pair).doc(s)
    assert abs(CostModel.for_model(cfg).doc(s) / exact - 1) > 0.1, name
