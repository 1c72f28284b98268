"""CART on 2 CPU cores: byte-level, d=128, P=2 prelude layers, a shared core run R=4 times.

    python train.py --config configs/cart_tiny.py --workdir runs/cart_tiny
    python train.py --config configs/cart_tiny.py:6 --workdir runs/cart_tiny_r6   # R=6

The optional argument is the training R (cart.loops).
"""

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config()
  c.steps = 600
  c.batch_size = 16
  c.seq_len = 256
  c.log_every = 25
  c.eval_every = 200
  m = c.model
  m.name = 'cart'
  m.d_model = 128
  m.num_heads = 2                    # head_dim 64, H = d/64 as in the paper
  m.num_kv_heads = 2
  m.head_dim = 64
  m.mlp_dim = 512                    # ceil((8d/3)/256)*256
  m.cart.prelude_layers = 2
  m.cart.coda_layers = 1
  m.cart.loops = int(arg) if arg else 4
  return c
