"""Small shared builders for tests: tiny configs, batches and a one-call train setup."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from parallelism import mesh as mesh_lib
from training.program import build_program


def tiny_config(**overrides):
  c = tiny.get_config()
  c.model.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128)
  c.batch_size, c.seq_len, c.steps = 8, 32, 10
  c.optimizer.warmup_steps = 2
  c.perf.peak_flops = 1e12
  c.progress = False
  for key, value in overrides.items():
    node = c
    *path, last = key.split('.')
    for p in path:
      node = node[p]
    node[last] = value
  return c


def random_batch(config, seed=0, num_docs=3):
  """Rows of `num_docs` packed documents with random lengths; last position of each doc
  has no target, like the real pipeline's padding."""
  rng = np.random.default_rng(seed)
  B, L, V = config.batch_size, config.seq_len, config.model.vocab_size
  inputs = rng.integers(0, V, (B, L), dtype=np.int32)
  targets = rng.integers(0, V, (B, L), dtype=np.int32)
  seg = np.zeros((B, L), np.int32)
  pos = np.zeros((B, L), np.int32)
  for b in range(B):
    cuts = np.sort(rng.choice(np.arange(1, L - 2), num_docs - 1, replace=False))
    bounds = [0, *cuts, L - 2]  # the last 2 positions are padding
    for d, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
      seg[b, s:e] = d + 1
      pos[b, s:e] = np.arange(e - s)
  targets[seg == 0] = -1
  return {'inputs': inputs, 'targets': targets, 'segment_ids': seg, 'positions': pos}


class Trainer:
  """A config on a mesh: the compiled program, its state, and host batches fed through it."""

  def __init__(self, config, devices=None):
    self.config = config
    self.program = build_program(config, mesh_lib.make_mesh(config.mesh, devices=devices))
    self.mesh = self.program.mesh
    self.state = self.program.init_state()

  def train(self, batches):
    losses = []
    for b in batches:
      self.state, m = self.program.train_step(self.state, self.program.global_batch(b))
      losses.append(float(m['loss']))
    return losses

  def params(self):
    return jax.tree.map(np.asarray, jax.device_get(self.state.params))


def forward_with_input_delta(model, tokens, delta_BLD, segment_ids, positions):
  """The dense model's forward with `delta` added to the embeddings (for gradient probes)."""
  from modeling.transformer import apply_blocks
  x = model.embed(tokens, jnp.float32) + delta_BLD
  x = apply_blocks(model.blocks, x, scanned=model.cfg.scan_layers, remat=model.cfg.remat,
                   segment_ids=segment_ids, positions=positions)
  return model.final_norm(x)
