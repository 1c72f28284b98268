"""SambaY on 2 CPU cores: 8 layers (Mamba/SWA self-decoder, memory Mamba, one shared-KV full
attention, GMU/cross-attention cross-decoder), byte-level, NoPE.

    python train.py --config configs/sambay_tiny.py --workdir runs/sambay_tiny
"""

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.steps = 300
  c.batch_size = 8
  c.seq_len = 256
  c.log_every = 25
  c.eval_every = 100
  c.optimizer.warmup_steps = 30
  m = c.model
  m.name = 'sambay'
  m.num_layers = 8          # the smallest depth with every role: M S M S | mem full | GMU cross
  m.d_model = 128
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 32
  m.mlp_dim = 512           # 4 d, as in the paper
  m.rope_theta = 0.0        # NoPE (model.sambay.nope) already skips rotary everywhere
  m.sambay.window = 64
  m.sambay.scan_impl = 'chunked'
  m.sambay.scan_chunk = 64
  return c
