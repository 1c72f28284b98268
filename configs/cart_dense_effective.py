"""Dense baseline matched to CART's effective parameters (configs/cart_dense.py): 11 layers
at d=1024, R=6 (174.2M vs CART's 178.2M effective; the paper used 12 layers).

    python train.py --config configs/cart_dense_effective.py:1024,6 --workdir runs/dense_eff
"""

from configs import cart_dense


def get_config(arg: str | None = None):
  d, r, layers = cart_dense.parse(arg)
  return cart_dense.dense_config(d, layers or cart_dense.matched_layers(d, r, 'effective'))
