"""The training loop's hybrid-data-parallel parts: whole documents in, planned steps out.

ByteScale (Ge et al., 2025), section 6 (data-aware scheduling): the planner needs the global
batch's length metadata, so with `parallelism.hybrid_dp.enabled` the pipeline yields whole
documents (not packed rows), every process reads the same global stream and computes the same
plan (`hybrid_dp.plan`), and the step runs it (`hybrid_exec.Executor`).
"""

import grain
import ml_collections
import numpy as np
from jax.sharding import Mesh

from parallelism import hybrid_dp
from training import hybrid_exec
from training.data import packing, sources
from training.state import ModelSetup


def check_config(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  h = config.parallelism.hybrid_dp
  hybrid_exec.check_config(config, mesh)
  if config.parallelism.context_impl != 'none':
    raise ValueError('parallelism.hybrid_dp.enabled runs its own ring per group: set '
                     f'parallelism.context_impl=none (got {config.parallelism.context_impl!r})')
  if config.data.source not in sources.DOCUMENT_SOURCES:
    raise ValueError(f'parallelism.hybrid_dp.enabled needs a document source; data.source='
                     f'{config.data.source!r}, valid: {sources.DOCUMENT_SOURCES}')
  # Documents are cut into pieces of at most seq_len tokens (as packing does); the longest
  # piece must fit the largest group.
  hybrid_dp.degree(config.seq_len, h.capacity, hybrid_dp.check_layouts(
      h.layouts, mesh.shape['data'] * mesh.shape['context']))


def _piece_tokens(piece: dict[str, np.ndarray]) -> np.ndarray:
  """A packing piece (inputs t[i:j], targets t[i+1:j+1]) as the tokens t[i:j+1]."""
  return np.concatenate([piece['inputs'], piece['targets'][-1:]]).astype(np.int32)


def make_train_iterator(config: ml_collections.ConfigDict) -> grain.DatasetIterator:
  """Endless batches of `batch_size` documents (lists of int32 token arrays of at most seq_len
  tokens), the same global stream on every process; checkpointable like the packed pipeline."""
  docs = grain.MapDataset.source(sources.make_document_source(config, 'train'))
  if config.data.shuffle:
    docs = docs.shuffle(seed=config.seed)
  ds = docs.repeat().to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=32))
  ds = ds.apply(packing.SplitDocument(config.seq_len - 1)).map(_piece_tokens)
  return iter(ds.batch(config.batch_size, drop_remainder=True, batch_fn=list))


class TrainStep:
  """(state, documents) -> (state, metrics): plan on the host, then one program per layout.

  Metrics (`hdp/*`, per step): `modelled_imbalance` (the plan's per-device total FLOPs,
  max/mean), `executed_imbalance` (the same measured from the device buffers that ran,
  `hybrid_dp.buffer_flops`), `lockstep_cost` (sum over micro-batches of the busiest device's
  executed FLOPs / mean per-device total: what synchronous micro-batches pay; 1 = no wait),
  `micro_batches`, `padding_fraction` (token slots computed that hold no token), `programs`
  (compiled programs so far, the update included)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, setup: ModelSetup):
    # The loop runs `check_config` (the data side) at start-up; the executor checks its own.
    self.h = config.parallelism.hybrid_dp
    self.cost = hybrid_dp.CostModel.for_model(config.model)
    self.executor = hybrid_exec.Executor(config, mesh, setup)

  def plan(self, documents) -> hybrid_dp.Plan:
    return hybrid_dp.plan([len(d) for d in documents], self.executor.pool, self.h.capacity,
                          layouts=self.h.layouts, slack=self.h.slack, cost=self.cost,
                          whole_groups=self.executor.whole_groups)

  def __call__(self, state, documents):
    p = self.plan(documents)
    micro = hybrid_dp.batch_buffers(p, documents)
    state, metrics = self.executor.train_step(state, micro)
    executed = np.stack([hybrid_dp.buffer_flops(b, self.cost) for _, b in micro])
    per_device = executed.sum(0)
    metrics = dict(metrics)
    metrics['hdp/modelled_imbalance'] = p.imbalance()
    metrics['hdp/executed_imbalance'] = float(per_device.max() / per_device.mean())
    metrics['hdp/lockstep_cost'] = float(executed.max(1).sum() / per_device.mean())
    metrics['hdp/micro_batches'] = len(p.micro_batches)
    metrics['hdp/padding_fraction'] = p.padding_fraction()
    metrics['hdp/programs'] = self.executor.program_count
    return state, metrics
