"""Planning for a length distribution: when the data's documents are shorter than a row, the
attention work of a static mesh depends on where their boundaries fall, and hybrid data
parallelism (`parallelism/hybrid/planner.py`) becomes a candidate.

Given document lengths (`parse_lengths`: a file, a named distribution, or the configured
corpus), one step's documents are drawn (`step_documents`, seeded) and every candidate is
charged for what its busiest device does with them:

  static   the documents concatenated in order and cut into rows of seq_len (as the packed
           pipeline does), rows dealt to the data x fsdp groups micro-batch by micro-batch,
           each row zigzagged over context; per micro-batch the busiest device's causal
           (query, key) pairs, summed over the step, replace the full rows' pairs in the
           attention term. Tokens are even, so the other terms are unchanged.
  hybrid   the hybrid-DP planner's own plan of the same documents at a capacity C; per
           micro-batch the busiest device by the family's cost (`CostModel.for_model`); its
           tokens and pairs, summed over the step, are the step's work (the plan's lockstep
           cost); the micro-batches count as accumulation steps of C tokens for memory; a
           group's ring transfers as a context ring of the group's size.

Counts are exact pairs at the query's device; the block kernels skip only whole dead block
pairs, so short documents cost somewhat more than counted (both arms alike).
"""

import dataclasses
import os

import numpy as np

from parallelism.context import layout
from parallelism.hybrid import planner as hybrid_lib
from parallelism.planner.estimate import Candidate, Estimate, communication, estimate
from parallelism.planner.hardware import Hardware
from parallelism.planner.workload import Workload

DISTRIBUTIONS = ('lognormal', 'pareto')


@dataclasses.dataclass(frozen=True)
class Documents:
  lengths: np.ndarray          # one step's documents, in order
  pair_flops: float            # forward FLOPs per causal (query, key) pair (registry)
  token_flops: float           # forward FLOPs per token, no pairs (registry)
  whole_groups: bool           # recurrent layers: a split document alone in its group


def parse_lengths(spec: str, *, corpus=None, seed: int = 0, samples: int = 4096) -> np.ndarray:
  """Document lengths from `spec`: a .npy file or a text file of integers (any separators),
  `lognormal:MEDIAN,SIGMA` or `pareto:SCALE,SHAPE` (seeded draws; Pareto as
  ceil(SCALE x (1 + Lomax(SHAPE)))), or `data`: `corpus()`, the configured corpus's lengths
  (`training/autoplan.corpus_lengths`; this package reads no data)."""
  if spec == 'data':
    if corpus is None:
      raise ValueError('--doc_lengths data needs the configured corpus')
    out = np.asarray(corpus(), np.int64)
  elif spec.split(':')[0] in DISTRIBUTIONS and ':' in spec:
    name, _, args = spec.partition(':')
    try:
      a, b = (float(x) for x in args.split(','))
    except ValueError:
      raise ValueError(f'--doc_lengths {spec!r}: expected {name}:A,B') from None
    rng = np.random.default_rng(seed)
    if name == 'lognormal':
      draws = rng.lognormal(np.log(a), b, samples)
    else:
      draws = a * (1 + rng.pareto(b, samples))
    out = np.ceil(draws).astype(np.int64)
  elif os.path.isfile(spec):
    out = (np.load(spec) if spec.endswith('.npy') else
           np.array(open(spec).read().replace(',', ' ').split(), np.float64)).astype(np.int64)
  else:
    raise ValueError(f'--doc_lengths {spec!r}: give a file of integers, data, '
                     'lognormal:MEDIAN,SIGMA or pareto:SCALE,SHAPE')
  out = out.ravel()
  if out.size == 0 or (out < 2).all():
    raise ValueError(f'--doc_lengths {spec!r}: no document of 2 or more tokens')
  return out[out >= 2]


def step_documents(lengths: np.ndarray, global_tokens: int, seed: int = 0) -> np.ndarray:
  """One step's documents: lengths drawn (seeded, with replacement) until they hold
  `global_tokens` tokens; the last one is cut to fit exactly."""
  rng = np.random.default_rng(seed)
  mean = float(np.mean(lengths))
  out = []
  total = 0
  while total < global_tokens:
    draw = rng.choice(lengths, size=max(int((global_tokens - total) / mean) + 1, 1))
    for s in draw:
      s = int(min(s, global_tokens - total))
      if s >= 1:
        out.append(s)
        total += s
      if total >= global_tokens:
        break
  return np.asarray(out, np.int64)


def _row_positions(lengths: np.ndarray, seq_len: int) -> np.ndarray:
  """[rows, seq_len] position of each token in its document piece (rows cut documents)."""
  pos = np.concatenate([np.arange(s) for s in lengths])
  rows = pos.reshape(-1, seq_len).copy()
  # A document cut at a row boundary continues as a new piece: positions restart there.
  for r in range(1, rows.shape[0]):
    first = rows[r, 0]
    if first:
      run = np.flatnonzero(rows[r] == 0)
      end = run[0] if run.size else seq_len
      rows[r, :end] -= first
  return rows


def static_pairs_per_token(c: Candidate, w: Workload, docs: Documents) -> float:
  """Causal pairs per token the candidate's busiest device computes over the step (per
  micro-batch maxima, summed), over its tokens."""
  rows = _row_positions(docs.lengths, w.seq_len) + 1      # pairs of each query
  groups = c.data * c.fsdp
  per_micro = rows.shape[0] // (groups * c.grad_accum)
  # Context device i holds the i-th of c equal slices of the zigzag-ordered row.
  takes = np.split(layout.zigzag_order(w.seq_len, c.context), c.context)
  busiest = 0.0
  for m in range(c.grad_accum):
    block = rows[m * groups * per_micro:(m + 1) * groups * per_micro]
    block = block.reshape(groups, per_micro, w.seq_len)
    per_device = [block[:, :, t].sum(axis=(1, 2)) for t in takes]     # [context][groups]
    busiest += float(np.max(per_device))
  return busiest / (rows.size / c.devices * c.tensor)


def with_documents(w: Workload, pairs_per_token: float, docs: Documents) -> Workload:
  """`w` with its attention term charged `pairs_per_token` causal pairs per token in place of
  full rows' (sliding-window and other per-token work stays)."""
  full_rows = docs.pair_flops * (w.seq_len - 1) / 2
  return dataclasses.replace(
      w, attention_flops=max(w.attention_flops - full_rows, 0.0)
      + docs.pair_flops * (pairs_per_token - 1))


@dataclasses.dataclass(frozen=True)
class HybridWork:
  tokens: float        # the busiest device's tokens, summed over micro-batches
  pairs: float         # its causal pairs, likewise
  micro_batches: int
  largest_group: list  # per micro-batch
  mean_document: float  # tokens per document as the pipeline cuts them


def cut(lengths: np.ndarray, limit: int) -> np.ndarray:
  """Documents as the hybrid-DP pipeline feeds them: whole up to `limit` tokens, longer ones in
  pieces of `limit` (and the rest)."""
  return np.concatenate([[limit] * (int(s) // limit) + ([int(s) % limit] if s % limit else [])
                         for s in lengths]).astype(np.int64)


def hybrid_work(docs: Documents, devices: int, capacity: int, layouts) -> HybridWork:
  """The hybrid-DP plan of the step's documents at `capacity`, as its busiest devices' work."""
  cost = hybrid_lib.CostModel(docs.token_flops, docs.pair_flops)
  # The pipeline feeds documents whole up to capacity x the largest group, longer ones in
  # pieces of that length (training/hybrid/data.py, max_doc_len=0).
  lengths = cut(docs.lengths, capacity * max(layouts))
  p = hybrid_lib.plan(lengths, devices, capacity, layouts=layouts, cost=cost,
                      whole_groups=docs.whole_groups)
  fake = [np.zeros(int(s), np.int32) for s in lengths]
  tokens = pairs = 0.0
  largest = []
  count = lambda b, linear, pair: hybrid_lib.buffer_flops(b, hybrid_lib.CostModel(linear, pair))
  for mb, (_, buffers) in zip(p.micro_batches, hybrid_lib.batch_buffers(p, fake)):
    d = int(np.argmax(hybrid_lib.buffer_flops(buffers, cost)))    # the busiest device
    tokens += float(count(buffers, 1.0, 0.0)[d])
    pairs += float(count(buffers, 0.0, 1.0)[d])
    largest.append(max(mb.layout))
  return HybridWork(tokens, pairs, len(p.micro_batches), largest, float(np.mean(lengths)))


def hybrid_layouts(devices: int) -> tuple[int, ...]:
  """Group sizes 1, 2, 4, ... up to the pool (each divides the next and the pool)."""
  out, g = [], 1
  while devices % g == 0 and g <= devices:
    out.append(g)
    g *= 2
  return tuple(out)


def hybrid_estimate(c: Candidate, w: Workload, hw: Hardware, docs: Documents,
                    work: HybridWork) -> Estimate:
  """A hybrid-DP candidate's step: its busiest devices' tokens and pairs at the profile's
  efficiencies (as a data-parallel step with one micro-batch per planned one), plus each
  split micro-batch's ring transfers as a context ring of its largest group."""
  per_device = work.tokens
  proxy_w = dataclasses.replace(with_documents(w, work.pairs / max(per_device, 1), docs),
                                global_tokens=int(per_device * c.devices))
  proxy = Candidate(c.data, c.fsdp, 1, 1, 'none', c.attention, c.remat, work.micro_batches)
  e = estimate(proxy, proxy_w, hw)
  # Memory: every micro-batch holds at most C tokens per device.
  acc_w = dataclasses.replace(w, global_tokens=c.capacity * c.devices)
  e_mem = estimate(Candidate(c.data, c.fsdp, 1, 1, 'none', c.attention, c.remat, 1), acc_w, hw)
  memory = dict(e_mem.memory)
  # Each device accumulates its own float32 gradient over the micro-batches (reduced once per
  # step), and under fsdp holds the gathered parameters for all of them.
  memory['state'] += w.params * 4 + (w.params * w.param_bytes if c.fsdp > 1 else 0)
  memory['total'] = memory['state'] + memory['activations'] + memory['logits']
  ring = 0.0
  for g in set(work.largest_group) - {1}:   # each split micro-batch: a ring of its group
    ring_c = Candidate(c.devices // g, 1, g, 1, 'ring', c.attention, c.remat, 1)
    one = communication(ring_c, acc_w, hw, e.time['compute'] / work.micro_batches)
    ring += work.largest_group.count(g) * one.get('context', 0.0)
  time = dict(e.time)
  time['comm_context'] = ring
  time['communication'] += ring
  time['step'] += ring
  return Estimate(memory, time, e.mfu * e.time['step'] / time['step'])
