"""CART at the paper's Stage 2 settings (Capps, 2026): P=6, R in {6, 8, 10}, seq 1024,
8 x 4 accumulation (32,768 tokens per step), 30,500 steps, lr 3e-4 cosine to 3e-5.

    python train.py --config configs/cart_paper.py:512,8 --workdir runs/cart_d512_r8

The argument is 'd_model[,R[,data]]'; configs/cart_d{256,512,768,1024}.py fix d_model and take
R. Prelude and coda are MLA layers (model.cart.*_attention='mla'), so parameter counts compare
with the paper's (125M stored / 179M effective at d=1024, R=6). Dense baselines:
configs/cart_dense_stored.py and cart_dense_effective.py.

Data (data='paper', the default): the paper's mixture, 30% TinyStories, 30% Wikipedia, 40%
FineWeb-Edu (data.mixture, training/data/mixture.py), tokenised with the Llama-2 tokenizer
(vocabulary 32,000). Nothing downloads; prepare the local files once:

  1. Download the three public sets as jsonl or parquet (each row one document, field `text`):
     TinyStories (roneneldan/TinyStories), English Wikipedia (wikimedia/wikipedia, 20231101.en)
     and FineWeb-Edu (HuggingFaceFW/fineweb-edu, e.g. its sample-10BT), and the Llama-2
     tokenizer model (tokenizer.model) into data/cart/llama2.model.
  2. Tokenise each into ArrayRecord shards (the paper trains on about 1B tokens in all):
       python scripts/prepare_data.py --source parquet --paths 'raw/tinystories/*.parquet' \
           --tokenizer sentencepiece:data/cart/llama2.model --out data/cart/tinystories
       python scripts/prepare_data.py --source parquet --paths 'raw/wikipedia/*.parquet' \
           --tokenizer sentencepiece:data/cart/llama2.model --out data/cart/wikipedia
       python scripts/prepare_data.py --source parquet --paths 'raw/fineweb_edu/*.parquet' \
           --tokenizer sentencepiece:data/cart/llama2.model --out data/cart/fineweb_edu
  3. Train; --config.data.mixture can point elsewhere. Each component keeps its own held-out
     split (data.eval_fraction), and its shards are checked against the tokenizer.

The paper reads single-domain 1024-token chunks in a fixed order; loomax packs documents of
one component at a time into rows (documents from different components may share a row).
data='bytes' keeps the offline byte-level default corpus (for plumbing checks).
"""

import math

from configs import base

PAPER_WIDTHS = (256, 512, 768, 1024)
PAPER_LOOPS = (6, 8, 10)
DATA_ROOT = 'data/cart'
# (component, weight): the paper's 30/30/40 recipe over prepare_data.py outputs in DATA_ROOT.
PAPER_MIX = (('tinystories', 0.3), ('wikipedia', 0.3), ('fineweb_edu', 0.4))


def paper_data(c, root: str = DATA_ROOT):
  """Sets the paper's mixture and tokenizer on config `c` (files under `root`)."""
  c.data.source = 'array_record'
  c.data.tokenizer = f'sentencepiece:{root}/llama2.model'
  c.data.mixture = tuple(({'source': 'array_record', 'paths': f'{root}/{name}'}, weight)
                         for name, weight in PAPER_MIX)
  return c


def paper_config(d_model: int, loops: int = 6, data: str = 'paper'):
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
  if data == 'paper':
    paper_data(c)
  elif data != 'bytes':
    raise ValueError(f"config argument data={data!r}; valid: 'paper' (the 30/30/40 mixture) "
                     "or 'bytes'")
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
  d, _, rest = (arg or '512').partition(',')
  r, _, data = rest.partition(',')
  return paper_config(int(d), parse_loops(r), data or 'paper')
