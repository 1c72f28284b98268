"""The paper's `sambay_d16` shape (ArchScale): L = 16, width 124 x 16 = 1,984, 16 heads x 128
with 4 KV groups, SwiGLU 4 d, vocabulary 32,000, context 4,096, SWA window 128, NoPE.

Sized for accelerators (about 1B parameters); not a CPU run.

    python train.py --config configs/sambay_d16.py --workdir runs/sambay_d16
"""

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.seq_len = 4096
  c.batch_size = 64
  m = c.model
  m.name = 'sambay'
  m.num_layers = 16
  m.d_model = 124 * 16
  m.num_heads = 16
  m.num_kv_heads = 4
  m.head_dim = 128
  m.mlp_dim = 4 * 124 * 16
  m.vocab_size = 32_000
  m.rope_theta = 0.0
  m.sambay.window = 128
  m.sambay.nope = True
  m.sambay.d_state = 16
  m.sambay.d_conv = 4
  m.sambay.expand = 2
  return c
