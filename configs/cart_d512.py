"""CART d=512 at the paper's Stage 2 settings (see configs/cart_paper.py); the argument is R.

    python train.py --config configs/cart_d512.py:6 --workdir runs/cart_d512_r6
"""

from configs import cart_paper


def get_config(arg: str | None = None):
  return cart_paper.paper_config(512, cart_paper.parse_loops(arg))
