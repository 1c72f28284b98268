"""The candidates: every way to cut the devices into data x fsdp x context x tensor, with each
context strategy, attention kernel, remat policy and gradient accumulation that applies; each
estimated (`estimate.py`), pruned by modelled memory and ranked by modelled step time."""

import dataclasses
import itertools

from parallelism.planner import documents
from parallelism.planner.estimate import Candidate, Estimate, estimate
from parallelism.planner.hardware import Hardware
from parallelism.planner.workload import Workload

ATTENTION = {'gpu': ('jax_nn', 'pallas', 'blockwise'), 'tpu': ('splash', 'blockwise'),
             'cpu': ('xla', 'blockwise')}
CONTEXT_IMPLS = ('ring', 'token_ring', 'allgather')
REMAT = ('none', 'dots', 'save_attention_out', 'full')


@dataclasses.dataclass(frozen=True)
class Planned:
  candidate: Candidate
  estimate: Estimate
  fits: bool            # modelled memory within the budget (after headroom)


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def factorisations(n: int):
  """(data, fsdp, context, tensor) with product n."""
  for data in _divisors(n):
    for fsdp in _divisors(n // data):
      for context in _divisors(n // data // fsdp):
        yield data, fsdp, context, n // data // fsdp // context


def candidates(w: Workload, hw: Hardware, devices: int, *, context_ok: bool = True,
               attention: tuple[str, ...] | None = None, max_accum: int = 16):
  """Every candidate the shapes allow: rows split evenly over data x fsdp (x accumulation),
  heads over tensor (within a node), the length over context (zigzag halves)."""
  kernels = attention or ATTENTION[hw.kind]
  for data, fsdp, context, tensor in factorisations(devices):
    if w.rows % (data * fsdp):
      continue
    if w.heads % tensor or tensor > hw.devices_per_node:
      continue
    if context > 1 and (not context_ok or w.seq_len % (2 * context)):
      continue
    impls = CONTEXT_IMPLS if context > 1 else ('none',)
    accums = [a for a in _divisors(w.rows // (data * fsdp)) if a <= max_accum]
    for impl, attn, remat, accum in itertools.product(impls, kernels, REMAT, accums):
      # Rings run a per-block kernel with a log-sum-exp: splash has none, and jax_nn (cuDNN)
      # becomes the dense per-block kernel there (modeling/kernels/auto.py): not what it names.
      if attn in ('splash', 'jax_nn') and context > 1:
        continue
      yield Candidate(data, fsdp, context, tensor, impl, attn, remat, accum)


def hybrid_candidates(w: Workload, hw: Hardware, devices: int, docs: documents.Documents, *,
                      attention: tuple[str, ...] | None = None):
  """(candidate, its planned work) for hybrid data parallelism over all `devices` as one
  pool: each fsdp split, capacity C = seq_len / 2^k (k = 0..4, even, whose plan holds the
  step's documents), kernel with a per-block form and remat policy."""
  layouts = documents.hybrid_layouts(devices)
  kernels = [k for k in (attention or ATTENTION[hw.kind]) if k not in ('splash', 'jax_nn')]
  for k in range(5):
    capacity = w.seq_len >> k
    # Even (zigzag halves), and seq_len (then the eval row length) within the longest
    # document the pool holds whole (training/hybrid/data.py).
    if capacity < 2 or capacity % 2 or capacity * max(layouts) < w.seq_len:
      break
    try:
      work = documents.hybrid_work(docs, devices, capacity, layouts)
    except ValueError:   # a document longer than the largest group holds
      continue
    # batch_size counts documents (pieces of at most capacity x the largest group): the token
    # budget over their mean length, a multiple of the pool (the eval rows shard over it).
    n_docs = -(-max(round(w.global_tokens / work.mean_document), 1) // devices) * devices
    for fsdp in _divisors(devices):
      for attn, remat in itertools.product(kernels, REMAT):
        yield Candidate(devices // fsdp, fsdp, 1, 1, 'none', attn, remat, 1, capacity,
                        layouts, n_docs), work


def plan(w: Workload, hw: Hardware, devices: int, memory_bytes: float, *,
         headroom: float = 0.9, docs: documents.Documents | None = None,
         hybrid: bool = True, **kwargs) -> list[Planned]:
  """All candidates, estimated; those that fit first, fastest first. Step times within 0.1%
  tie (the model cannot tell them apart); ties go to fewer micro-batches (larger matmuls), then
  to less recomputation, then to less memory. With `docs` (a step's document lengths), static
  candidates are charged their busiest device's attention pairs and hybrid-DP candidates join
  (`documents.py`)."""
  out = []
  charged = {}
  for c in candidates(w, hw, devices, **kwargs):
    cw = w
    if docs is not None:
      key = (c.data * c.fsdp, c.context, c.grad_accum)
      if key not in charged:
        charged[key] = documents.with_documents(
            w, documents.static_pairs_per_token(c, w, docs), docs)
      cw = charged[key]
    e = estimate(c, cw, hw)
    out.append(Planned(c, e, e.memory['total'] <= headroom * memory_bytes))
  if docs is not None and hybrid:
    for c, work in hybrid_candidates(w, hw, devices, docs, attention=kwargs.get('attention')):
      e = documents.hybrid_estimate(c, w, hw, docs, work)
      out.append(Planned(c, e, e.memory['total'] <= headroom * memory_bytes))
  out.sort(key=lambda p: (not p.fits, float(f"{p.estimate.time['step']:.3g}"),
                          p.candidate.grad_accum, REMAT.index(p.candidate.remat),
                          p.estimate.memory['total']))
  return out
