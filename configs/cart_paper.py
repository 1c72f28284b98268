"""CART at the paper's Stage 2 settings (Capps, 2026): P=6, R in {6, 8, 10}, seq 1024,
8 x 4 accumulation (32,768 tokens per step), 30,500 steps, lr 3e-4 cosine to 3e-5.

    python train.py --config configs/cart_paper.py:512,8 --workdir runs/cart_d512_r8

The argument is 'd_model[,R]'; configs/cart_d{256,512,768,1024}.py fix d_model and take R.
Vocabulary 32,000 as the paper's Llama-2 tokenizer (the byte-level pipeline uses ids 0..255),
so parameter counts compare with the paper's.
"""

import math

from configs import base

PAPER_WIDTHS = (256, 512, 768, 1024)
PAPER_LOOPS = (6, 8, 10)


def paper_config(d_model: int, loops: int = 6):
  if d_model % 64:
    raise ValueError(f'model.d_model={d_model} must be a multiple of the head dim 64; '
                     f'paper widths: {PAPER_WIDTHS}')
  c = base.get_config()
  c.steps = 30_500
  c.batch_size = 32                  # 8 sequences x 4 micro-batches
  c.seq_len = 1024
  c.log_every = 50                   # the paper logs rho every 50 steps
  c.eval_every = 500
  m = c.model
  m.name = 'cart'
  m.d_model = d_model
  m.num_heads = d_model // 64
  m.num_kv_heads = d_model // 64     # plain multi-head attention
  m.head_dim = 64
  m.mlp_dim = math.ceil((8 * d_model / 3) / 256) * 256
  m.vocab_size = 32_000
  m.dtype = 'bfloat16'
  m.cart.prelude_layers = 6
  m.cart.coda_layers = 1
  m.cart.loops = loops
  o = c.optimizer
  o.lr = 3e-4
  o.min_lr_ratio = 0.1
  o.warmup_steps = 100
  o.weight_decay = 0.1
  o.decay_norms_and_biases = True    # the reference decays every parameter (theta and a too)
  o.clip_norm = 1.0
  o.grad_accum_steps = 4
  return c


def parse_loops(arg: str | None) -> int:
  if not arg:
    return 6
  try:
    return int(arg)
  except ValueError:
    raise ValueError(f'config argument {arg!r} must be the training R (model.cart.loops), '
                     f'e.g. one of {PAPER_LOOPS}') from None


def get_config(arg: str | None = None):
  d, _, r = (arg or '512').partition(',')
  return paper_config(int(d), parse_loops(r))
