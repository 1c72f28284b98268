"""CART d=1024 at the paper's Stage 2 settings (see configs/cart_paper.py); the argument is R.

    python train.py --config configs/cart_d1024.py:6 --workdir runs/cart_d1024_r6
"""

from configs import cart_paper


def get_config(arg: str | None = None):
  return cart_paper.paper_config(1024, cart_paper.parse_loops(arg))
