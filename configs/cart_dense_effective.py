"""Dense baseline matched to CART's effective parameters (configs/cart_dense.py): 11 layers
at d=1024, R=6 (174.2M vs CART's 178.2M effective; the paper used 12 layers).

    python train.py --config configs/cart_dense_effective.py:1024,6 --workdir runs/dense_eff
"""

from configs import cart_dense

# Depths already counted (d_model, R) -> layers, so loading a paper config builds no model.
KNOWN = {(1024, 6): 11}


def get_config(arg: str | None = None):
  d, r = cart_dense.parse(arg)
  layers = KNOWN.get((d, r)) or cart_dense.matched_layers(d, r, 'effective')
  return cart_dense.dense_config(d, layers)
