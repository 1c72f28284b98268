"""Dense baselines for CART at the paper's Stage 2 settings (configs/cart_paper.py): the same
width, heads, MLP, vocabulary, data and optimizer, a plain transformer whose depth matches a
CART model's parameter count. configs/cart_dense_stored.py and cart_dense_effective.py pick
the target; both take the argument 'd_model[,R]' of the CART model they match (default 1024,6).

The depth is the one whose count is nearest the target (CART counted with `jax.eval_shape`).
At d=1024, R=6 (MLA prelude/coda): CART 124.4M stored / 178.2M effective; dense 7 layers
122.7M (stored-matched, as the paper's 7) and 11 layers 174.2M (effective-matched; the paper
used 12 layers, 187.0M here, farther from either 178M or its table's 179M).
"""

from configs import base, cart_paper


def dense_config(d_model: int, layers: int):
  c = cart_paper.paper_config(d_model, 6)
  m = c.model
  m.name = 'transformer'
  m.num_layers = layers
  m.cart = base.get_config().model.cart  # unused by the dense model; defaults restored
  m.init_std = 0.02
  return c


def matched_layers(d_model: int, loops: int, target: str) -> int:
  """The dense depth whose stored parameter count is nearest CART's `target` count
  ('stored' or 'effective') at this width and R."""
  from modeling import cart, registry  # noqa: configs import only ml_collections at load
  import jax
  import ml_collections
  from flax import nnx

  stored, effective = cart.parameter_counts(cart_paper.paper_config(d_model, loops).model)
  goal = {'stored': stored, 'effective': effective}[target]

  def count(layers):
    m = ml_collections.FrozenConfigDict(dense_config(d_model, layers).model)
    model = nnx.eval_shape(lambda: registry.build_model(m, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

  return min(range(1, 64), key=lambda n: abs(count(n) - goal))


def parse(arg: str | None) -> tuple[int, int]:
  d, _, r = (arg or '1024').partition(',')
  return int(d), cart_paper.parse_loops(r)
