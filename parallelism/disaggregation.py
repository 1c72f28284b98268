"""Core-attention disaggregation, the host-side planner: balance the attention work each device
actually computes by moving whole query blocks to other devices.

Zhuang et al., "Efficiently Training LLMs with Core Attention Disaggregation" (DistCA, 2025,
arXiv 2510.18121), section 4. With packed variable-length documents every device holds the
same tokens but not the same attention work. Core attention has no parameters, so part of it
can run elsewhere: a task is some query rows plus the key/value rows they need.

How the pieces fit (a newcomer's map):
  parallelism/disaggregation.py         this file: numpy planner -> fixed-shape int32 arrays
  parallelism/ragged.py                 the ragged exchange (only the planned rows travel)
  parallelism/disaggregation_attend.py  dispatch / compute / return, and the ping-pong layer
  training/programs/                    the disaggregated program's host prepare runs
                                        `Planner`: the plan joins the batch as 'dca_*' arrays
                                        (shape [n devices, nano-batches, ...])
  training/step.py                      passes `plan_of(batch)` to the model as `attn_plan`,
                                        down the blocks to the attend call: a step input

Work is counted as the kernel executes it. The blockwise kernel computes a (query block, key
block) pair unless its skip test (`modeling.blockwise.block_table`) proves it fully masked, so
the planner evaluates that same test on the host, per row (`per_row=True`), and a device's
work is its count of live block pairs. The unit that moves is one query block (`block_q` rows
of one row) together with the key blocks it needs (its live key blocks), so moved work is
exactly the block pairs the server then executes: the server lays received blocks out whole,
in the source's block alignment, with segment ids offset per source row so blocks of
different rows never share a live pair. Exact causal query-key pairs (the paper's FLOPs) are
reported beside it as the modelled figure. (DistCA's head-tail split moves work at token
granularity; with a blockwise kernel a partial query block still costs the whole block.)

Scheduler (communication-aware greedy, after DistCA Algorithm 1): repeatedly take the device
with the least work and, from devices above the mean, the query block with the fewest bytes
per moved block pair (query rows there and outputs back, plus key/value blocks not already
sent from that row to that device), among blocks that fit the need (else the smallest that
still lowers the larger of the two loads); stop when every device is within `tolerance` of
the mean. A block moves at most once, from its owner; capacities are respected, never
exceeded (what cannot move stays, and the imbalance is reported).

Decisions and limits:
- `parallelism.context_impl='disaggregated'` moves work over the batch mesh axes (data, fsdp);
  it does not compose with a context axis (mesh.context must be 1; a clear error says so).
- Buffers: each device sends at most `dca_q_capacity` x its nano-batch tokens of query rows
  and `dca_kv_capacity` x of key/value rows, and receives at most as many; the exchange is
  ragged (`parallelism/ragged.py`), so bytes sent are the planned rows, not the capacity.
- One host plans the whole batch (single process) and the whole step
  (`optimizer.grad_accum_steps=1`); both are checked with clear errors.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from modeling import blockwise

PREFIX = 'dca_'
EMPTY_Q, EMPTY_KV = -1, -2  # segment ids of unused buffer slots (real ids are >= 0): dead
MOVED_Q = EMPTY_Q           # an own query block that runs elsewhere: dead at home


def causal_pairs(segment_ids, positions) -> np.ndarray:
  """Exact causal query-key pairs per token: position + 1 inside a document, 0 for padding."""
  return np.where(np.asarray(segment_ids) > 0, np.asarray(positions) + 1, 0).astype(np.int64)


@dataclasses.dataclass
class Schedule:
  """One nano-batch's plan, per device [n] unless noted."""
  work_before: np.ndarray        # live block pairs the kernel executes without moving anything
  work_after: np.ndarray         # ... after the moves (own rows + received blocks)
  flops_before: np.ndarray       # exact causal query-key pairs of the device's own queries
  flops_after: np.ndarray        # ... of the queries it computes after the moves
  q_blocks: np.ndarray           # [n, n] query blocks sent source -> destination
  kv_blocks: np.ndarray          # [n, n] key/value blocks sent source -> destination
  moves: list                    # (source, row, query block, destination)
  block_q: int = 0
  block_kv: int = 0
  q_cap: int = 0                 # blocks a device may send / receive (the buffers' size)
  kv_cap: int = 0


def live_blocks(segment_ids_RL, positions_RL, block_q: int, block_kv: int) -> np.ndarray:
  """Bool [R, nq, nk]: the block pairs the blockwise kernel computes for each causal row."""
  return blockwise.block_table(segment_ids_RL, segment_ids_RL, positions_RL, positions_RL,
                               causal=True, window=0, block_q=block_q, block_kv=block_kv,
                               per_row=True, xp=np)


def schedule(live, pairs, *, tolerance: float, q_cap: int, kv_cap: int, q_cost: float,
             kv_cost: float, max_moves: int = 100_000) -> Schedule:
  """Greedy balancing of executed block pairs over devices.

  live [n, R, nq, nk] bool (per device, row, query block: the live key blocks);
  pairs [n, R, nq] exact causal pairs of each query block; q_cap / kv_cap: blocks each device
  may send and receive; q_cost / kv_cost: bytes of one query block (there and back) and of
  one key/value block.
  """
  n, R, nq, nk = live.shape
  w = live.sum(-1).astype(np.int64)                 # [n, R, nq] block pairs per query block
  E = w.sum(axis=(1, 2))
  before = E.copy()
  F = pairs.sum(axis=(1, 2)).astype(np.int64)
  F_before = F.copy()
  avg = E.sum() / n
  moved = np.zeros((n, R, nq), bool)
  sent = np.zeros((n, R, n, nk), bool)              # key blocks of (source, row) at a device
  q_blocks = np.zeros((n, n), np.int64)
  kv_blocks = np.zeros((n, n), np.int64)
  moves = []
  for _ in range(max_moves):
    if E.max() <= (1 + tolerance) * avg:
      break
    e = int(np.argmin(E))
    need = avg - E[e]
    best = None
    for s in np.flatnonzero(E > avg):
      if q_blocks[s].sum() >= q_cap or q_blocks[:, e].sum() >= q_cap:
        continue
      new_kv = (live[s] & ~sent[s, :, e][:, None, :]).sum(-1)      # [R, nq]
      ok = (~moved[s]) & (w[s] > 0) & (E[e] + w[s] < E[s])
      ok &= (kv_blocks[s].sum() + new_kv <= kv_cap) & (kv_blocks[:, e].sum() + new_kv <= kv_cap)
      if not ok.any():
        continue
      over = w[s] > min(need, E[s] - avg)                            # overshoots someone
      cost = (q_cost + kv_cost * new_kv) / np.maximum(w[s], 1)
      key = np.where(ok, over * 1e30 + np.where(over, w[s], cost), np.inf)
      r, i = np.unravel_index(int(np.argmin(key)), key.shape)
      cand = (float(key[r, i]), -int(w[s, r, i]), int(s), int(r), int(i))
      if best is None or cand < best:
        best = cand
    if best is None:
      break  # nothing movable: the caller reports the remaining imbalance
    _, _, s, r, i = best
    add = live[s, r, i] & ~sent[s, r, e]
    sent[s, r, e] |= live[s, r, i]
    moved[s, r, i] = True
    q_blocks[s, e] += 1
    kv_blocks[s, e] += int(add.sum())
    E[s] -= w[s, r, i]
    E[e] += w[s, r, i]
    F[s] -= pairs[s, r, i]
    F[e] += pairs[s, r, i]
    moves.append((s, r, i, e))
  return Schedule(before, E, F_before, F, q_blocks, kv_blocks, moves)


# ------------------------------------------------------------------ fixed-shape arrays

def capacities(tokens: int, q_capacity: float, kv_capacity: float, block_q: int,
               block_kv: int) -> tuple[int, int]:
  """Blocks each device may send and receive, from fractions of its nano-batch tokens."""
  return (max(1, math.ceil(q_capacity * tokens / block_q)),
          max(1, math.ceil(kv_capacity * tokens / block_kv)))


def _offsets(counts):
  """[n, n] chunk counts -> (send_off [n, n] at the source per destination, recv_off [n, n] at
  the destination per source), in chunks, both laid out in device order."""
  send = np.concatenate([np.zeros((counts.shape[0], 1), np.int64),
                         np.cumsum(counts, axis=1)[:, :-1]], axis=1)
  recv = np.concatenate([np.zeros((counts.shape[0], 1), np.int64),
                         np.cumsum(counts.T, axis=1)[:, :-1]], axis=1)
  return send, recv


def _route(counts, chunk: int, prefix: str) -> dict[str, np.ndarray]:
  n = counts.shape[0]
  send, recv = _offsets(counts)
  return {f'{prefix}send_off': (send * chunk).astype(np.int32),
          f'{prefix}recv_off': (recv * chunk).astype(np.int32),
          f'{prefix}dest_off': (recv.T * chunk).astype(np.int32),
          f'{prefix}origin_off': (send.T * chunk).astype(np.int32),
          f'{prefix}counts': np.broadcast_to(counts.astype(np.int32), (n, n, n)).copy()}


def plan_arrays(segment_ids_RL, positions_RL, n: int, *, tolerance: float, block_q: int,
                block_kv: int, q_cap: int, kv_cap: int, q_bytes: float = 1.0,
                kv_bytes: float = 1.0):
  """The plan of one nano-batch: rows [n * R, L], device d holding rows [d R, (d+1) R).

  Returns (arrays, schedule). Arrays, int32 with leading dim n (T = R L local tokens, Q / K
  = q_cap block_q / kv_cap block_kv rows of send and receive buffer):
    own_qseg [n, T]            own query ids: the batch's, -1 where the block runs elsewhere
    q_send [n, Q], kv_send [n, K]   local token indices of the rows sent, grouped by destination
    q_seg, q_pos [n, Q]        the server's received queries: ids offset per source row
    kv_seg, kv_pos [n, K]      the server's received keys/values, likewise (-1 / -2 unused)
    ret [n, T]                 where each own token's output is: [0, T) kept, T + j returned
    q_*, kv_* routes           `ragged.Route` fields for the two exchanges (rows / chunks)
  """
  NR, L = segment_ids_RL.shape
  R = NR // n
  T = R * L
  seg = np.asarray(segment_ids_RL).reshape(n, R, L).astype(np.int64)
  pos = np.asarray(positions_RL).reshape(n, R, L).astype(np.int32)
  nq, nk = L // block_q, L // block_kv
  live = live_blocks(seg.reshape(n * R, L), pos.reshape(n * R, L), block_q,
                     block_kv).reshape(n, R, nq, nk)
  pairs = causal_pairs(seg, pos).reshape(n, R, nq, block_q).sum(-1)
  qb = 2 * block_q * q_bytes
  kb = block_kv * kv_bytes
  sched = schedule(live, pairs, tolerance=tolerance, q_cap=q_cap, kv_cap=kv_cap, q_cost=qb,
                   kv_cost=kb)
  sched.block_q, sched.block_kv, sched.q_cap, sched.kv_cap = block_q, block_kv, q_cap, kv_cap

  Q, K = q_cap * block_q, kv_cap * block_kv
  own_qseg = seg.reshape(n, T).copy()
  q_send = np.zeros((n, Q), np.int32)
  kv_send = np.zeros((n, K), np.int32)
  q_seg = np.full((n, Q), EMPTY_Q, np.int64)
  kv_seg = np.full((n, K), EMPTY_KV, np.int64)
  q_pos = np.zeros((n, Q), np.int32)
  kv_pos = np.zeros((n, K), np.int32)
  ret = np.tile(np.arange(T, dtype=np.int32), (n, 1))
  # Per destination, in source order: every (source, row)'s query blocks, then its key blocks.
  by_pair: dict[tuple[int, int], dict[int, list[int]]] = {}
  for s, r, i, e in sched.moves:
    by_pair.setdefault((s, e), {}).setdefault(r, []).append(i)
  q_counts, kv_counts = sched.q_blocks, sched.kv_blocks
  q_send_off, q_recv_off = _offsets(q_counts)
  kv_send_off, kv_recv_off = _offsets(kv_counts)
  span = int(seg.max()) + 1  # server ids: source row (s, r) gets [1 + (s R + r) span, ...)
  for (s, e), rows in sorted(by_pair.items()):
    qo, ko = q_send_off[s, e], kv_send_off[s, e]       # in blocks
    qi, ki = q_recv_off[e, s], kv_recv_off[e, s]
    for r, blocks in sorted(rows.items()):
      base = 1 + (s * R + r) * span
      keys = np.flatnonzero(live[s, r, sorted(blocks)].any(0))
      for i in sorted(blocks):
        tok = r * L + i * block_q + np.arange(block_q)
        sl = slice(qo * block_q, (qo + 1) * block_q)
        q_send[s, sl] = tok
        ret[s, tok] = T + np.arange(sl.start, sl.stop)
        own_qseg[s, tok] = MOVED_Q
        dl = slice(qi * block_q, (qi + 1) * block_q)
        q_seg[e, dl] = base + seg[s, r, i * block_q:(i + 1) * block_q]
        q_pos[e, dl] = pos[s, r, i * block_q:(i + 1) * block_q]
        qo, qi = qo + 1, qi + 1
      for j in keys:
        tok = r * L + j * block_kv + np.arange(block_kv)
        kv_send[s, ko * block_kv:(ko + 1) * block_kv] = tok
        dl = slice(ki * block_kv, (ki + 1) * block_kv)
        kv_seg[e, dl] = base + seg[s, r, j * block_kv:(j + 1) * block_kv]
        kv_pos[e, dl] = pos[s, r, j * block_kv:(j + 1) * block_kv]
        ko, ki = ko + 1, ki + 1
  if q_seg.max() >= 2 ** 31:
    raise ValueError('disaggregation: too many segments for int32 ids')
  arrays = {'own_qseg': own_qseg.astype(np.int32), 'q_send': q_send, 'kv_send': kv_send,
            'q_seg': q_seg.astype(np.int32), 'q_pos': q_pos, 'kv_seg': kv_seg.astype(np.int32),
            'kv_pos': kv_pos, 'ret': ret,
            **_route(q_counts, block_q, 'q_'), **_route(kv_counts, block_kv, 'kv_')}
  return arrays, sched


def plan_batch(segment_ids_BL, positions_BL, n: int, *, nano_batches: int, tolerance: float,
               block_q: int, block_kv: int, q_capacity: float, kv_capacity: float,
               q_bytes: float = 1.0, kv_bytes: float = 1.0
               ) -> tuple[dict[str, np.ndarray], list[Schedule]]:
  """Plans every nano-batch of a global batch [B, L] whose rows are split over `n` devices.

  Nano-batch a of device d is its local rows [a R/A, (a+1) R/A). Returns the batch-dict
  entries ('dca_' + name, shape [n, A, ...]) and the per-nano-batch schedules.
  """
  B, L = segment_ids_BL.shape
  if B % (n * nano_batches):
    raise ValueError(f'batch rows {B} not divisible by {n} devices x '
                     f'parallelism.dca_nano_batches={nano_batches}')
  bq = blockwise.fit_block(L, block_q, 'attention.block_q')
  bk = blockwise.fit_block(L, block_kv, 'attention.block_kv')
  R, A = B // n, nano_batches
  Ra = R // A
  q_cap, kv_cap = capacities(Ra * L, q_capacity, kv_capacity, bq, bk)
  seg = np.asarray(segment_ids_BL).reshape(n, A, Ra, L)
  pos = np.asarray(positions_BL).reshape(n, A, Ra, L)
  per_nano, scheds = [], []
  for a in range(A):
    arrays, sched = plan_arrays(seg[:, a].reshape(n * Ra, L), pos[:, a].reshape(n * Ra, L), n,
                                tolerance=tolerance, block_q=bq, block_kv=bk, q_cap=q_cap,
                                kv_cap=kv_cap, q_bytes=q_bytes, kv_bytes=kv_bytes)
    per_nano.append(arrays)
    scheds.append(sched)
  out = {PREFIX + k: np.stack([p[k] for p in per_nano], axis=1) for k in per_nano[0]}
  return out, scheds


def device_flops(scheds: list[Schedule]) -> tuple[np.ndarray, np.ndarray]:
  """Per-device exact causal query-key pairs (before, after) summed over nano-batches."""
  return (sum(s.flops_before for s in scheds), sum(s.flops_after for s in scheds))


def device_work(scheds: list[Schedule]) -> tuple[np.ndarray, np.ndarray]:
  """Per-device executed block pairs (before = data parallelism with the per-row kernel,
  after) summed over nano-batches."""
  return (sum(s.work_before for s in scheds), sum(s.work_after for s in scheds))


def exchange_bytes(scheds: list[Schedule], q_row_bytes: float, kv_row_bytes: float) -> dict:
  """Bytes one layer's forward exchange moves per device (mean, max over devices): queries out
  and outputs back (q rows each way) and key/value rows, from the plan's block counts, which
  are the ragged exchange's trip counts."""
  sent = 0
  for s in scheds:
    q = s.q_blocks * s.block_q * q_row_bytes
    kv = s.kv_blocks * s.block_kv * kv_row_bytes
    sent = sent + q.sum(1) + kv.sum(1) + q.sum(0)   # out (q, kv), back (outputs of received q)
  sent = np.asarray(sent, np.float64)
  return {'mean': float(sent.mean()), 'max': float(sent.max()), 'per_device': sent}


def summary(scheds: list[Schedule], q_row_bytes: float, kv_row_bytes: float) -> dict[str, float]:
  """The telemetry row of one planned batch (`dca/*`)."""
  f0, f1 = device_flops(scheds)
  w0, w1 = device_work(scheds)
  b = exchange_bytes(scheds, q_row_bytes, kv_row_bytes)
  ratio = lambda x: float(x.max() / max(x.mean(), 1e-30))
  # Buffer use: the fullest send or receive buffer (rows used / capacity) over the batch.
  use = max(max(s.q_blocks.sum(0).max(), s.q_blocks.sum(1).max()) / max(s.q_cap, 1)
            for s in scheds)
  use_kv = max(max(s.kv_blocks.sum(0).max(), s.kv_blocks.sum(1).max()) / max(s.kv_cap, 1)
               for s in scheds)
  return {'dca/q_buffer_use': float(use), 'dca/kv_buffer_use': float(use_kv),
          'dca/modelled_imbalance': ratio(f1), 'dca/modelled_imbalance_before': ratio(f0),
          'dca/executed_imbalance': ratio(w1), 'dca/executed_imbalance_before': ratio(w0),
          'dca/executed_vs_dp': float(w1.mean() / max(w0.mean(), 1e-30)),
          'dca/executed_block_pairs_max': float(w1.max()),
          'dca/moved_blocks': float(sum(s.q_blocks.sum() for s in scheds)),
          'dca/bytes_sent_mean': b['mean'], 'dca/bytes_sent_max': b['max']}


# ------------------------------------------------------------------ wiring into a run

def batch_devices(config: ml_collections.ConfigDict, mesh) -> int:
  """How many devices share the attention work: the mesh axes the 'batch' rule names."""
  from modeling import axes as ax
  from parallelism import rules as rules_lib
  spec = rules_lib.logical_to_spec((ax.BATCH,), config.parallelism.rules, mesh)
  return rules_lib.mesh_axes_size(mesh, spec[0])


def planner_kwargs(config: ml_collections.ConfigDict) -> dict:
  p, m = config.parallelism, config.model
  heads, kv_heads, head_dim = m.num_heads, m.num_kv_heads, m.head_dim
  return {'nano_batches': p.dca_nano_batches, 'tolerance': p.dca_tolerance,
          'block_q': config.attention.block_q, 'block_kv': config.attention.block_kv,
          'q_capacity': p.dca_q_capacity, 'kv_capacity': p.dca_kv_capacity,
          'q_bytes': heads * head_dim, 'kv_bytes': 2 * kv_heads * head_dim}


def row_bytes(config: ml_collections.ConfigDict) -> tuple[float, float]:
  """Bytes of one query row and one key/value row (K and V) in the exchange's dtype."""
  m = config.model
  item = 2 if m.dtype in ('bfloat16', 'float16') else 4
  return m.num_heads * m.head_dim * item, 2 * m.num_kv_heads * m.head_dim * item


class Planner:
  """Plans the host batches of one run: `planner(batch)` adds the batch's plan as 'dca_*'
  arrays (shape [n devices, nano-batches, ...]), which travel in the device batch and reach
  the attend fn as the model call's explicit `attn_plan` (`plan_of`). Remembers the last
  batch's plan, so the telemetry (`last_schedules`) reads the plan the step ran."""

  def __init__(self, config: ml_collections.ConfigDict, mesh):
    import jax
    if jax.process_count() > 1:
      raise ValueError("parallelism.context_impl='disaggregated' plans on one host: "
                       'multi-process runs would need the global segment ids on every host '
                       '(not implemented)')
    self.n = batch_devices(config, mesh)
    self.kwargs = planner_kwargs(config)
    self._last = None   # (segment ids, positions, (arrays, schedules))

  def plan(self, segment_ids_BL, positions_BL) -> tuple[dict[str, np.ndarray], list[Schedule]]:
    """`plan_batch` of this run's devices and settings; the same batch twice is planned once
    (the telemetry and the host layout may both ask; planning costs tens of ms)."""
    seg, pos = np.asarray(segment_ids_BL), np.asarray(positions_BL)
    last = self._last
    if last is not None and np.array_equal(last[0], seg) and np.array_equal(last[1], pos):
      return last[2]
    result = plan_batch(seg, pos, self.n, **self.kwargs)
    self._last = (seg.copy(), pos.copy(), result)
    return result

  def __call__(self, batch: dict) -> dict:
    plan, _ = self.plan(batch['segment_ids'], batch['positions'])
    return {**batch, **plan}

  def abstract(self, batch_size: int, seq_len: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{'dca_*': (shape, dtype)} of every plan of [batch_size, seq_len] batches (the shapes are
    fixed by the settings; this plans one empty batch), for compiling without a batch."""
    seg = np.zeros((batch_size, seq_len), np.int32)
    arrays, _ = plan_batch(seg, seg, self.n, **self.kwargs)
    return {k: (v.shape, v.dtype) for k, v in arrays.items()}


def plan_of(batch: dict) -> dict | None:
  """The attend fn's plan from a device batch: its 'dca_*' arrays without the prefix, or None
  (no per-batch attention plan)."""
  plan = {k[len(PREFIX):]: v for k, v in batch.items() if k.startswith(PREFIX)}
  return plan or None


def with_plan(config: ml_collections.ConfigDict, mesh,
              layout: Callable[[dict], dict]) -> Callable[[dict], dict]:
  """`layout` followed by adding this batch's plan ('dca_*' arrays), when disaggregated."""
  if config.parallelism.context_impl != 'disaggregated':
    return layout
  planner = Planner(config, mesh)
  return lambda batch: planner(layout(batch))
