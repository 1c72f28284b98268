"""Dense baseline matched to CART's stored parameters (configs/cart_dense.py): 7 layers at
d=1024, R=6 (122.7M vs CART's 124.4M), the paper's 7-layer baseline.

    python train.py --config configs/cart_dense_stored.py:1024,6 --workdir runs/dense_stored
"""

from configs import cart_dense

# Depths already counted (d_model, R) -> layers, so loading a paper config builds no model.
KNOWN = {(1024, 6): 7}


def get_config(arg: str | None = None):
  d, r = cart_dense.parse(arg)
  layers = KNOWN.get((d, r)) or cart_dense.matched_layers(d, r, 'stored')
  return cart_dense.dense_config(d, layers)
