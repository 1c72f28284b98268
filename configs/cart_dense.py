"""Dense baselines for CART at the paper's Stage 2 settings (configs/cart_paper.py): the same
width, heads, MLP, vocabulary, data and optimizer, a plain transformer whose depth matches a
CART model's parameter count. configs/cart_dense_stored.py and cart_dense_effective.py pick
the target; both take the argument 'd_model[,R]' of the CART model they match (default 1024,6).

The depth is the one whose count is nearest the target (`DEPTHS`, counted with `jax.eval_shape`).
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


# Depths whose stored parameter count is nearest CART's stored / effective count, counted with
# jax.eval_shape (count = a + b x layers, fitted per width) for d_model 256, 512, 768 and 1024,
# the paper configs' widths: the same at every one of them. configs/ import only
# ml_collections, so the table is data; other shapes pass the depth as 'd,R,layers'.
DEPTHS = {2: (7, 8), 4: (7, 10), 6: (7, 11), 8: (7, 13)}   # R -> (stored, effective)
WIDTHS = (256, 512, 768, 1024)


def matched_layers(d_model: int, loops: int, target: str) -> int:
  """The dense depth matched to CART's `target` ('stored' or 'effective') count."""
  if d_model not in WIDTHS or loops not in DEPTHS:
    raise ValueError(f'no counted dense depth for CART d_model={d_model}, R={loops} (counted: '
                     f'd_model in {WIDTHS}, R in {sorted(DEPTHS)}): pass it as '
                     "'d_model,R,layers'")
  return DEPTHS[loops][('stored', 'effective').index(target)]


def parse(arg: str | None) -> tuple[int, int, int | None]:
  """'d_model[,R[,layers]]' -> (d_model, R, layers or None)."""
  d, _, rest = (arg or '1024').partition(',')
  r, _, layers = rest.partition(',')
  return int(d), cart_paper.parse_loops(r), int(layers) if layers else None
