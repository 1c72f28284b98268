"""Core-attention disaggregation, the host-side planner: balance causal attention FLOPs across
the data-parallel devices by moving token-level attention tasks.

Zhuang et al., "Efficiently Training LLMs with Core Attention Disaggregation" (DistCA, 2025,
arXiv 2510.18121), section 4. With packed variable-length documents every device holds the
same tokens but not the same attention work (a document of length L costs L(L+1)/2 query-key
pairs). Core attention has no parameters, so part of it can run elsewhere: a task is a set of
query rows of one document plus the key/value prefix they need.

How the pieces fit (a newcomer's map):
  parallelism/disaggregation.py         this file: numpy planner -> static-capacity int32 arrays
  parallelism/disaggregation_attend.py  the `AttendFn`: gather, all_to_all, varlen attention,
                                        all_to_all back (ping-pong over nano-batches)
  training/loop.py                      `with_plan` adds the plan to every host batch as keys
                                        'dca_*' (shape [n devices, nano-batches, ...])
  training/step.py                      `use_plan(batch)` puts those arrays in scope while the
                                        model runs; the attend fn reads them (`current_plan`)
The plan is a side channel on purpose: the attention seam's signature (q, k, v, segment ids,
positions) stays the same for every model family, and the plan arrays are ordinary jitted
arguments (traced, so a new plan per batch does not recompile).

Decisions and limits:
- `parallelism.context_impl='disaggregated'` (a value of the existing key): the work moves
  over the batch mesh axes (data, fsdp), and it does not compose with a context axis
  (mesh.context must be 1; a clear error says so). Ring for the longest documents would need
  a two-level plan (which documents ring over context, which move as tasks); not built.
- Static capacity: every (source, destination) pair has a bucket of `dca_q_capacity` x T
  query rows and `dca_kv_capacity` x T key/value rows (T = a device's nano-batch tokens); a
  plan that does not fit raises a ValueError naming both keys. The exchange is a padded
  `all_to_all`: `ragged_all_to_all` would send only used rows, but XLA:CPU (jax 0.10.2)
  rejects it ("UNIMPLEMENTED: HLO opcode `ragged-all-to-all` is not supported by XLA:CPU"),
  so it is not used here.
- One host plans the whole batch (single process) and the whole step
  (`optimizer.grad_accum_steps=1`); both are checked with clear errors.

Splitting (the head-tail trick, DistCA section 4.1). Query ranks of a document are taken from
its centre outwards in "units": for even L unit k is {L/2-1-k, L/2+k}, whose costs (rank + 1
keys each) add to exactly L+1; for odd L unit 0 is the centre {c} (cost (L+1)/2) and unit k
is {c-k, c+k} (cost L+1). Moved work is therefore exact and the needed key prefix grows
by one per side per unit. Every query runs on exactly one device with its whole key prefix,
so no log-sum-exp merge is needed and the result is exact.

Scheduler (communication-aware greedy, DistCA Algorithm 1): repeatedly take the device
furthest below the mean, and from the devices above the mean pick the document whose move
costs the fewest bytes per moved FLOP (Q rows sent + K/V rows not already sent to that
device); move min(need, donor surplus) rounded to whole units; stop when every device is
within `tolerance` of the mean. Donors give only their own documents and never drop below
the mean, recipients never rise above it (up to half a unit), so tasks move at most once.
"""

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable

import ml_collections
import numpy as np

PREFIX = 'dca_'
# Server-side segment id of an own query that runs elsewhere: no key has it (own ids are >= 1).
MOVED_Q = 0


# ------------------------------------------------------------------ documents and units

@dataclasses.dataclass
class Doc:
  device: int
  row: int                  # row within the device's nano-batch
  index: np.ndarray         # flat local token indices (row * L + t), in position order
  taken: int = 0            # units already moved away (from the centre outwards)

  @property
  def length(self) -> int:
    return len(self.index)

  @property
  def units(self) -> int:
    return (self.length + 1) // 2


def doc_flops(length) -> np.ndarray:
  """Query-key pairs of causal attention over one document: L(L+1)/2."""
  length = np.asarray(length, np.int64)
  return length * (length + 1) // 2


def units_cost(length: int, start: int, stop: int) -> int:
  """Pairs of units [start, stop) of a document (each L+1, the odd centre (L+1)/2)."""
  if stop <= start:
    return 0
  cost = (stop - start) * (length + 1)
  if length % 2 and start == 0:
    cost -= (length + 1) // 2
  return cost


def unit_ranks(length: int, start: int, stop: int) -> np.ndarray:
  """Query ranks (0-based, position order) of units [start, stop)."""
  k = np.arange(start, stop)
  if length % 2 == 0:
    h = length // 2
    return np.concatenate([h - 1 - k, h + k])
  c = (length - 1) // 2
  return np.unique(np.concatenate([c - k, c + k]))


def last_rank(length: int, stop: int) -> int:
  """The highest query rank among units [0, stop): the key prefix they need is [0, this]."""
  return length // 2 + stop - 1


def find_docs(segment_ids_RL: np.ndarray, positions_RL: np.ndarray, device: int) -> list[Doc]:
  """Documents (segment id > 0) of one device's rows; padding (segment 0) never moves."""
  L = segment_ids_RL.shape[1]
  docs = []
  for r in range(segment_ids_RL.shape[0]):
    for s in np.unique(segment_ids_RL[r]):
      if s == 0:
        continue
      t = np.nonzero(segment_ids_RL[r] == s)[0]
      t = t[np.argsort(positions_RL[r, t], kind='stable')]
      docs.append(Doc(device, r, r * L + t))
  return docs


# ------------------------------------------------------------------ the scheduler

@dataclasses.dataclass
class Task:
  doc: int
  dest: int
  units: list[tuple[int, int]]   # unit ranges [start, stop) moved to `dest`
  prefix: int                    # keys [0, prefix) of the document needed at `dest`


@dataclasses.dataclass
class Schedule:
  docs: list[Doc]
  tasks: list[Task]
  flops_before: np.ndarray       # per device, query-key pairs
  flops_after: np.ndarray


def schedule(docs: list[Doc], n: int, *, tolerance: float, q_bytes: float = 1.0,
             kv_bytes: float = 1.0, max_moves: int = 100_000) -> Schedule:
  """Greedy communication-aware balancing of causal attention work over `n` devices."""
  F = np.zeros(n, np.int64)
  for d in docs:
    F[d.device] += doc_flops(d.length)
  before = F.copy()
  avg = F.sum() / n
  tasks: dict[tuple[int, int], Task] = {}
  for _ in range(max_moves):
    if np.all(np.abs(F - avg) <= tolerance * avg):
      break
    r = int(np.argmin(F))
    need = avg - F[r]
    best = None
    for i, d in enumerate(docs):
      surplus = F[d.device] - avg
      if surplus <= 0 or d.taken >= d.units:
        continue
      give = min(need, surplus)
      m = min(round(give / (d.length + 1)), d.units - d.taken)
      if m == 0:
        continue
      moved = units_cost(d.length, d.taken, d.taken + m)
      prefix = last_rank(d.length, d.taken + m) + 1
      old = tasks.get((i, r))
      new_kv = prefix - (old.prefix if old else 0)
      q_rows = len(unit_ranks(d.length, d.taken, d.taken + m))
      cost = (q_rows * q_bytes + new_kv * kv_bytes) / moved
      if best is None or cost < best[0]:
        best = (cost, i, m, moved, prefix)
    if best is None:
      break  # nothing movable in whole units; the caller reports the remaining imbalance
    _, i, m, moved, prefix = best
    d = docs[i]
    task = tasks.setdefault((i, r), Task(i, r, [], 0))
    task.units.append((d.taken, d.taken + m))
    task.prefix = max(task.prefix, prefix)
    d.taken += m
    F[d.device] -= moved
    F[r] += moved
  return Schedule(docs, list(tasks.values()), before, F)


# ------------------------------------------------------------------ static-capacity arrays

def capacities(tokens: int, q_capacity: float, kv_capacity: float) -> tuple[int, int]:
  """Rows per (source, destination) buffer, from fractions of a device's nano-batch tokens."""
  def rows(frac):
    return max(8, math.ceil(frac * tokens / 8) * 8)
  return rows(q_capacity), rows(kv_capacity)


def _task_ranks(sched: Schedule, t: Task) -> np.ndarray:
  d = sched.docs[t.doc]
  return np.concatenate([unit_ranks(d.length, a, b) for a, b in t.units])


def plan_arrays(segment_ids_RL, positions_RL, n: int, *, tolerance: float, q_capacity: int,
                kv_capacity: int, q_bytes: float = 1.0, kv_bytes: float = 1.0):
  """The plan of one nano-batch: rows [n * R, L], device d holding rows [d R, (d+1) R).

  Returns (arrays, schedule). Arrays, all int32 with leading dim n (T = R L local tokens,
  Cq / Ck = capacities per (source, destination) pair):
    q_send [n, n, Cq]    local token indices of the queries sent to each destination
    kv_send [n, n, Ck]   local token indices of the keys/values sent to each destination
    q_seg, q_pos [n, T + n Cq]   the server's queries: own tokens, then received ones
    kv_seg, kv_pos [n, T + n Ck] the server's keys, likewise
    ret [n, T]           where each own token's output is: [0, T) kept, T + d Cq + j returned
  """
  NR, L = segment_ids_RL.shape
  R = NR // n
  T = R * L
  docs = []
  for dev in range(n):
    docs += find_docs(segment_ids_RL[dev * R:(dev + 1) * R], positions_RL[dev * R:(dev + 1) * R],
                      dev)
  sched = schedule(docs, n, tolerance=tolerance, q_bytes=q_bytes, kv_bytes=kv_bytes)

  seg = segment_ids_RL.reshape(n, T).astype(np.int64)
  pos = positions_RL.reshape(n, T).astype(np.int32)
  # Own tokens keep their documents, made unique across the device's rows (padding too, so
  # padding rows attend exactly as on one device).
  local_id = (np.arange(T) // L)[None] * (int(seg.max()) + 1) + seg + 1
  next_id = int(local_id.max()) + 1
  q_send = np.zeros((n, n, q_capacity), np.int32)
  kv_send = np.zeros((n, n, kv_capacity), np.int32)
  q_seg = np.zeros((n, T + n * q_capacity), np.int64)
  q_pos = np.zeros((n, T + n * q_capacity), np.int32)
  kv_seg = np.zeros((n, T + n * kv_capacity), np.int64)
  kv_pos = np.zeros((n, T + n * kv_capacity), np.int32)
  q_seg[:, :T], q_pos[:, :T] = local_id, pos
  kv_seg[:, :T], kv_pos[:, :T] = local_id, pos
  ret = np.tile(np.arange(T, dtype=np.int32), (n, 1))
  groups: dict[tuple[int, int], list[Task]] = {}
  for t in sched.tasks:
    groups.setdefault((t.dest, sched.docs[t.doc].device), []).append(t)
  # Server-side ids rise along each destination's buffer (own tokens, then source 0's tasks,
  # its empty slots, source 1's, ...), so the blockwise kernel's segment-range test skips the
  # block pairs of different tasks and of empty slots.
  for dst in range(n):
    for src in range(n):
      q0 = k0 = 0
      for t in groups.get((dst, src), []):
        d = sched.docs[t.doc]
        ranks = _task_ranks(sched, t)
        q_idx, kv_idx = d.index[ranks], d.index[:t.prefix]
        nq, nk = len(q_idx), len(kv_idx)
        if q0 + nq > q_capacity or k0 + nk > kv_capacity:
          need_q = sum(len(_task_ranks(sched, u)) for u in groups[dst, src])
          need_kv = sum(u.prefix for u in groups[dst, src])
          raise ValueError(
              f'disaggregation plan needs {need_q} query rows and {need_kv} key/value rows '
              f'from device {src} to device {dst}; capacity is {q_capacity} and {kv_capacity}: '
              f'raise parallelism.dca_q_capacity / parallelism.dca_kv_capacity (fractions of a '
              f"device's {T} nano-batch tokens)")
        q_send[src, dst, q0:q0 + nq] = q_idx
        kv_send[src, dst, k0:k0 + nk] = kv_idx
        at_q = T + src * q_capacity + q0      # where the rows land in the destination's buffer
        at_k = T + src * kv_capacity + k0
        q_seg[dst, at_q:at_q + nq], q_pos[dst, at_q:at_q + nq] = next_id, pos[src, q_idx]
        kv_seg[dst, at_k:at_k + nk], kv_pos[dst, at_k:at_k + nk] = next_id, pos[src, kv_idx]
        q_seg[src, q_idx] = MOVED_Q
        ret[src, q_idx] = T + dst * q_capacity + q0 + np.arange(nq)
        next_id += 1
        q0, k0 = q0 + nq, k0 + nk
      # Empty slots: ids of their own (queries and keys differ), so they match nothing.
      q_seg[dst, T + src * q_capacity + q0:T + (src + 1) * q_capacity] = next_id
      kv_seg[dst, T + src * kv_capacity + k0:T + (src + 1) * kv_capacity] = next_id + 1
      next_id += 2
  if next_id >= 2 ** 31:
    raise ValueError('disaggregation: too many segments for int32 ids')
  arrays = {'q_send': q_send, 'kv_send': kv_send, 'q_seg': q_seg.astype(np.int32),
            'q_pos': q_pos, 'kv_seg': kv_seg.astype(np.int32), 'kv_pos': kv_pos, 'ret': ret}
  return arrays, sched


def plan_batch(segment_ids_BL, positions_BL, n: int, *, nano_batches: int, tolerance: float,
               q_capacity: float, kv_capacity: float, q_bytes: float = 1.0,
               kv_bytes: float = 1.0) -> tuple[dict[str, np.ndarray], list[Schedule]]:
  """Plans every nano-batch of a global batch [B, L] whose rows are split over `n` devices.

  Nano-batch a of device d is its local rows [a R/A, (a+1) R/A). Returns the batch-dict
  entries ('dca_' + name, shape [n, A, ...]) and the per-nano-batch schedules.
  """
  B, L = segment_ids_BL.shape
  if B % (n * nano_batches):
    raise ValueError(f'batch rows {B} not divisible by {n} devices x '
                     f'parallelism.dca_nano_batches={nano_batches}')
  R, A = B // n, nano_batches
  Ra = R // A
  T = Ra * L
  cq, ck = capacities(T, q_capacity, kv_capacity)
  seg = np.asarray(segment_ids_BL).reshape(n, A, Ra, L)
  pos = np.asarray(positions_BL).reshape(n, A, Ra, L)
  per_nano, scheds = [], []
  for a in range(A):
    arrays, sched = plan_arrays(seg[:, a].reshape(n * Ra, L), pos[:, a].reshape(n * Ra, L), n,
                                tolerance=tolerance, q_capacity=cq, kv_capacity=ck,
                                q_bytes=q_bytes, kv_bytes=kv_bytes)
    per_nano.append(arrays)
    scheds.append(sched)
  out = {PREFIX + k: np.stack([p[k] for p in per_nano], axis=1) for k in per_nano[0]}
  return out, scheds


def pair_rows(sched: Schedule, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Query and key/value rows each (source, destination) pair needs: [n, n] each."""
  q, kv = np.zeros((n, n), np.int64), np.zeros((n, n), np.int64)
  for t in sched.tasks:
    src = sched.docs[t.doc].device
    q[src, t.dest] += len(_task_ranks(sched, t))
    kv[src, t.dest] += t.prefix
  return q, kv


def device_flops(scheds: list[Schedule]) -> tuple[np.ndarray, np.ndarray]:
  """Per-device query-key pairs (before, after) summed over nano-batches."""
  return (sum(s.flops_before for s in scheds), sum(s.flops_after for s in scheds))


# ------------------------------------------------------------------ wiring into a run

def batch_devices(config: ml_collections.ConfigDict, mesh) -> int:
  """How many devices share the attention work: the mesh axes the 'batch' rule names."""
  from modeling import axes as ax
  from parallelism import rules as rules_lib
  spec = rules_lib.logical_to_spec((ax.BATCH,), config.parallelism.rules, mesh)
  return rules_lib.mesh_axes_size(mesh, spec[0])


def planner_kwargs(config: ml_collections.ConfigDict) -> dict:
  p, m = config.parallelism, config.model
  heads, kv_heads, head_dim = (m.get('num_heads', 1), m.get('num_kv_heads', 1),
                               m.get('head_dim', 1))
  return {'nano_batches': p.dca_nano_batches, 'tolerance': p.dca_tolerance,
          'q_capacity': p.dca_q_capacity, 'kv_capacity': p.dca_kv_capacity,
          'q_bytes': heads * head_dim, 'kv_bytes': 2 * kv_heads * head_dim}


def with_plan(config: ml_collections.ConfigDict, mesh,
              layout: Callable[[dict], dict]) -> Callable[[dict], dict]:
  """`layout` followed by adding this batch's plan ('dca_*' arrays), when disaggregated."""
  if config.parallelism.context_impl != 'disaggregated':
    return layout
  import jax
  if jax.process_count() > 1:
    raise ValueError("parallelism.context_impl='disaggregated' plans on one host: multi-process "
                     'runs would need the global segment ids on every host (not implemented)')
  n = batch_devices(config, mesh)
  kwargs = planner_kwargs(config)

  def add_plan(batch):
    batch = layout(batch)
    plan, _ = plan_batch(batch['segment_ids'], batch['positions'], n, **kwargs)
    return {**batch, **plan}

  return add_plan


# ------------------------------------------------------------------ the side channel

_PLAN: contextvars.ContextVar = contextvars.ContextVar('dca_plan', default=None)


@contextlib.contextmanager
def use_plan(batch: dict):
  """Makes the batch's 'dca_*' arrays (if any) visible to the attend fn while the model runs."""
  plan = {k[len(PREFIX):]: v for k, v in batch.items() if k.startswith(PREFIX)}
  token = _PLAN.set(plan or None)
  try:
    yield
  finally:
    _PLAN.reset(token)


def current_plan() -> dict:
  plan = _PLAN.get()
  if plan is None:
    raise ValueError(
        "parallelism.context_impl='disaggregated' needs the batch's plan arrays ('dca_*', "
        'from parallelism.disaggregation.with_plan) in scope: run the model inside '
        '`disaggregation.use_plan(batch)` (training/step.py does)')
  return plan
