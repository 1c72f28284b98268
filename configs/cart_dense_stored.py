"""Dense baseline matched to CART's stored parameters (configs/cart_dense.py): 7 layers at
d=1024, R=6 (122.7M vs CART's 124.4M), the paper's 7-layer baseline.

    python train.py --config configs/cart_dense_stored.py:1024,6 --workdir runs/dense_stored
"""

from configs import cart_dense


def get_config(arg: str | None = None):
  d, r, layers = cart_dense.parse(arg)
  return cart_dense.dense_config(d, layers or cart_dense.matched_layers(d, r, 'stored'))
