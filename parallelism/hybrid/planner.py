"""Hybrid data parallelism: a per-batch host planner that gives each sequence its own
context-parallel degree.

ByteScale (Ge et al., "ByteScale: Efficient Scaling of LLM Training with a 2048K Context
Length on More Than 12,000 GPUs", 2025), sections 4 and 5: the data and context axes form one
pool of N devices, each holding at most C tokens per micro-batch. A sequence longer than C
spans D(s) >= ceil(s / C) devices (a group of a size in `layouts`). Micro-batches run one after
another and every device waits for the slowest one in each, so what a step pays is the lockstep
sum: over micro-batches, the busiest device's cost. That is what this planner minimises
(default, `mixed_layouts=True`):

- A micro-batch is the pool cut into groups of any sizes from `layouts`, e.g. (4, 2, 1, 1):
  a document split over 4 devices beside one over 2 and two devices of whole short documents.
  Groups are placed largest first, so a micro-batch's layout is a sorted tuple
  (`canonical_layout`) and the executor compiles one program per distinct tuple (at most the
  partitions of N into layout sizes: 10 for N = 8 and (1, 2, 4, 8)).
- Split documents first, then whole ones, each heaviest per-device cost first, go where they
  raise their micro-batch's busiest device least (ties: best fit in tokens, then the earliest
  micro-batch). A split document may join a group already open of g >= D(s) devices (split
  finer, filling their room); a short document that fits no device whole may join an open
  group too (the ring sends whole C-token buffers anyway, so no extra bytes). A micro-batch is
  opened only when the document fits none open (first fit).
- A local search then moves whole documents off each micro-batch's busiest device to another
  micro-batch where they do not raise its busiest device (each move lowers the sum).
- Groups of one size, and single devices, go to the places whose running total is lowest, so
  the per-device totals (the paper's Alg. 2 objective) stay balanced as a second aim.
- The uniform plan (`mixed_layouts=False`: one group size per micro-batch, Alg. 1 packing and
  Alg. 2 balancing of per-device totals, as ByteScale describes) is computed too, and the
  plan with the lower lockstep sum is returned, so the sum is never above it.

Micro-batch count: first fit guarantees only that no micro-batch's first document fit an
earlier one; measured (tests/test_hybrid_dp.py, random Pareto and lognormal batches) it stays
within one of ceil(tokens incl. zigzag padding / (N x C)), and equals it on the bench's mixes.

Pure Python/numpy on length metadata: every process computes the same plan. Execution
(`training/hybrid/executor.py`): inside a group each document is cut into 2g pieces and member i
holds pieces i and 2g-1-i (zigzag per document, ByteScale section 5.3), so every member does
the same causal work.

`whole_groups=True` (models with recurrent layers: a scan and a causal conv follow token
order) gives a split document its group to itself: padded to g x capacity tokens, so each
member holds exactly two pieces of capacity/2, the layout of a zigzag context axis, and the
context-parallel scan and conv halo (`context/scan.py`) run unchanged inside the group. Short
documents then go only to g = 1 micro-batches, and such plans use one group size per
micro-batch (the uniform planner). The price is padding: up to 1 - g'/g of the group (g' the
next smaller layout) instead of under 2g tokens.
"""

import copy
import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np

FIELDS = ('inputs', 'targets', 'segment_ids', 'positions')


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Training FLOPs of one document: linear per token + attention per (query, key) pair."""
  linear: float = 1.0
  pair: float = 0.0

  def doc(self, s: int) -> float:
    return self.linear * s + self.pair * s * (s + 1) / 2  # causal: s(s+1)/2 pairs

  @classmethod
  def for_model(cls, model_cfg) -> 'CostModel':
    """The family's own cost from the registry (`Family.planner_cost`: forward FLOPs per token
    and per causal query-key pair, matching its FLOP counter, docs/measuring.md), x3 for
    forward + backward. Every layer kind counts as the family builds it: CART's prelude, R
    core cross-attentions and coda; SambaY's Mamba, sliding-window, full and cross layers."""
    from modeling import registry   # here: the planner itself is numpy on length metadata
    family = registry.get_family(model_cfg.name)
    if family.planner_cost is None:
      raise ValueError(f'model.name={model_cfg.name!r} has no planner_cost in its registry '
                       'entry (modeling/registry.py): the hybrid-DP planner needs its FLOPs '
                       'per token and per causal query-key pair')
    linear, pair = family.planner_cost(model_cfg)
    return cls(linear=3.0 * linear, pair=3.0 * pair)


def padded_length(s: int, g: int) -> int:
  """Tokens a document of length s takes in a group of g: a multiple of 2g (zigzag pieces)."""
  return s if g == 1 else -(-s // (2 * g)) * 2 * g


def per_device_tokens(s: int, g: int) -> int:
  return padded_length(s, g) // g


def check_layouts(layouts: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Sorted group sizes; each must divide the pool and the next larger size (a ring of the
  largest group's steps then brings every smaller group's dK/dV home), and 1 is required."""
  out = tuple(sorted({int(g) for g in layouts}))
  bad = [g for g in out if g < 1 or num_devices % g]
  bad += [b for a, b in zip(out, out[1:]) if b % a]
  if bad or 1 not in out:
    raise ValueError(f'parallelism.hybrid_dp.layouts={tuple(layouts)}: group sizes must divide '
                     f'the pool of {num_devices} devices, each the next larger one, and include '
                     f'1 (bad: {bad})')
  return out


def degree(s: int, capacity: int, layouts: Sequence[int]) -> int:
  """D(s): the smallest group size in `layouts` whose members each hold <= capacity tokens."""
  for g in sorted(layouts):
    if per_device_tokens(s, g) <= capacity:
      return g
  raise ValueError(
      f'a sequence of {s} tokens needs {math.ceil(s / capacity)} devices of '
      f'parallelism.hybrid_dp.capacity={capacity} tokens, but the largest group in '
      f'parallelism.hybrid_dp.layouts={tuple(sorted(layouts))} is {max(layouts)}: raise the '
      'capacity, add a larger layout (dividing the pool), or cap the data length')


def _member_takes(L: int, g: int) -> list[np.ndarray]:
  """Indices of a padded document that group member m holds: pieces m and 2g-1-m of 2g."""
  if g == 1:
    return [np.arange(L)]
  p = L // (2 * g)
  return [np.r_[m * p:(m + 1) * p, (2 * g - 1 - m) * p:(2 * g - m) * p] for m in range(g)]


def split_cost(s: int, g: int, cost: CostModel, L: int | None = None) -> np.ndarray:
  """[g] FLOPs of each member for a document split over a group: real tokens and causal
  (query, key) pairs of its own queries (padding at the document's end makes it uneven).
  `L`: the padded length (default `padded_length(s, g)`)."""
  L = padded_length(s, g) if L is None else L
  out = np.zeros(g)
  for m, take in enumerate(_member_takes(L, g)):
    real = take[take < s]
    out[m] = cost.linear * len(real) + cost.pair * float((real + 1).sum())
  return out


@dataclasses.dataclass
class Unit:
  """Documents sharing one group of g devices in one micro-batch: each either split over the
  whole group (member -1) or held whole by one member."""
  g: int
  docs: list[tuple[int, int]] = dataclasses.field(default_factory=list)
  used: np.ndarray = None    # [g] tokens per member
  cost: np.ndarray = None    # [g] FLOPs per member

  def __post_init__(self):
    self.used = np.zeros(self.g, np.int64) if self.used is None else self.used
    self.cost = np.zeros(self.g) if self.cost is None else self.cost


@dataclasses.dataclass
class MicroBatch:
  """One lockstep micro-batch: the pool cut into consecutive groups of the sizes in `layout`
  (device order); groups[j] holds what group j runs (None = idle)."""
  layout: tuple[int, ...]
  groups: list[Unit | None]

  @property
  def starts(self) -> list[int]:
    return [int(s) for s in np.cumsum((0,) + self.layout[:-1])]

  @property
  def key(self) -> int | tuple[int, ...]:
    """What the executor compiles for: g when every group has g devices, else the layout."""
    return self.layout[0] if len(set(self.layout)) == 1 else self.layout

  def device_cost(self) -> np.ndarray:
    out = np.zeros(sum(self.layout))
    for s, g, u in zip(self.starts, self.layout, self.groups):
      if u is not None:
        out[s:s + g] = u.cost
    return out


def canonical_layout(layout: Sequence[int]) -> tuple[int, ...]:
  """Group sizes largest first: the one order compiled per multiset of sizes."""
  return tuple(sorted((int(g) for g in layout), reverse=True))


def uniform_layout(g: int, num_devices: int) -> tuple[int, ...]:
  return (g,) * (num_devices // g)


@dataclasses.dataclass
class Plan:
  num_devices: int
  capacity: int
  lengths: np.ndarray
  degrees: np.ndarray
  micro_batches: list[MicroBatch]
  whole_groups: bool = False  # a split document fills its group (see the module docstring)

  @property
  def micro_costs(self) -> np.ndarray:
    """[micro-batches, devices] modelled FLOPs."""
    return np.stack([mb.device_cost() for mb in self.micro_batches]).reshape(
        -1, self.num_devices)

  @property
  def device_cost(self) -> np.ndarray:
    """Modelled FLOPs per device over the step."""
    return self.micro_costs.sum(0)

  @property
  def layouts_used(self) -> tuple[int, ...]:
    """The group sizes the plan uses."""
    return tuple(sorted({g for mb in self.micro_batches for g in mb.layout}))

  @property
  def programs(self) -> tuple[int | tuple[int, ...], ...]:
    """Distinct compiled layouts (executor keys) the plan runs."""
    return tuple(sorted({mb.key for mb in self.micro_batches}, key=str))

  def imbalance(self) -> float:
    """Modelled max/mean of the per-device totals."""
    return float(self.device_cost.max() / self.device_cost.mean())

  def lockstep_cost(self) -> float:
    """What synchronous micro-batches pay: sum over micro-batches of the busiest device's
    modelled FLOPs, over the mean per-device total (1 = no device ever waits)."""
    c = self.micro_costs
    return float(c.max(1).sum() / c.sum(0).mean())

  def padding_fraction(self) -> float:
    slots = len(self.micro_batches) * self.num_devices * self.capacity
    return 1.0 - float(self.lengths.sum()) / slots

  def token_slots_needed(self) -> int:
    """Tokens the plan must hold (zigzag padding of split documents included): the lower
    bound on micro-batches is ceil(this / (devices x capacity))."""
    return int(sum(u.used.sum() for mb in self.micro_batches for u in mb.groups
                   if u is not None))


# ------------------------------------------------------------------ alg. 1: split documents

def _pack_long(lengths, degrees, capacity, cost: CostModel, whole_groups: bool) -> list[Unit]:
  """Alg. 1 for documents longer than C: best-fit into groups of their degree, each split
  over its whole group (with `whole_groups`, alone, filling every member)."""
  units: list[Unit] = []
  for i in sorted(np.flatnonzero(degrees > 1), key=lambda i: (-degrees[i], -lengths[i], i)):
    s, g = int(lengths[i]), int(degrees[i])
    t = capacity if whole_groups else per_device_tokens(s, g)
    fits = [u for u in units if u.g == g and u.used.max() + t <= capacity]
    u = min(fits, key=lambda u: capacity - u.used.max() - t) if fits else None
    if u is None:
      u = Unit(g)
      units.append(u)
    u.docs.append((int(i), -1))
    u.used += t
    u.cost += split_cost(s, g, cost, g * capacity if whole_groups else None)
  return units


@dataclasses.dataclass
class _Uniform:
  g: int
  groups: list[Unit]  # aligned group j = devices j*g .. (j+1)*g - 1


def _balance_long(units: list[Unit], n: int, load: np.ndarray) -> list[_Uniform]:
  """Alg. 2 for the groups: largest per-device cost first, each to the aligned group whose
  load after taking it peaks lowest (ties: fewer micro-batches of that size)."""
  slots: dict[int, list[list[Unit]]] = {}
  for u in sorted(units, key=lambda u: (-u.cost.max(), -u.g)):
    per_group = slots.setdefault(u.g, [[] for _ in range(n // u.g)])
    peak = (load.reshape(n // u.g, u.g) + u.cost).max(axis=1)
    j = int(min(range(n // u.g), key=lambda j: (peak[j], len(per_group[j]), j)))
    per_group[j].append(u)
    load[j * u.g:(j + 1) * u.g] += u.cost
  micro = []
  for g in sorted(slots, reverse=True):
    per_group = slots[g]
    for k in range(max(len(q) for q in per_group)):
      micro.append(_Uniform(g, [q[k] if k < len(q) else Unit(g) for q in per_group]))
  return micro


def _place_short(order, lengths, capacity, cost: CostModel, micro: list[_Uniform],
                 load: np.ndarray, slack: float, whole_groups: bool) -> None:
  """Alg. 2 for documents of at most C, largest first, each whole onto one device: the least
  loaded one, or any within `slack` x mean load of it where the document fits space already
  in a micro-batch (best fit: fewer, fuller micro-batches); otherwise a new single-device
  micro-batch on the least-loaded device."""
  n = len(load)
  for i in order:
    s, c = int(lengths[i]), cost.doc(int(lengths[i]))
    tol = slack * load.mean()
    near = np.flatnonzero(load <= load.min() + tol)
    fits = [(capacity - u.used[d % mb.g] - s, load[d], d, k) for k, mb in enumerate(micro)
            for d in near for u in [mb.groups[d // mb.g]] if u.used[d % mb.g] + s <= capacity
            and not (whole_groups and mb.g > 1)]
    if fits:
      _, _, d, k = min(fits)
    else:
      d, k = int(np.argmin(load)), len(micro)
      micro.append(_Uniform(1, [Unit(1) for _ in range(n)]))
    mb = micro[k]
    u, m = mb.groups[d // mb.g], d % mb.g
    u.docs.append((int(i), m))
    u.used[m] += s
    u.cost[m] += c
    load[d] += c


# ------------------------------------------------------------------ the lockstep planner

@dataclasses.dataclass
class _Group:
  g: int
  slots: np.ndarray                   # the micro-batch's slots, in member order
  docs: list[int] = dataclasses.field(default_factory=list)   # split over the whole group


class _Filling:
  """A micro-batch being filled: `n` device slots whose places in the pool are fixed at the
  end (any order of the same groups computes the same, so only the multiset of group sizes
  is compiled)."""

  def __init__(self, n: int):
    self.used = np.zeros(n, np.int64)
    self.cost = np.zeros(n)
    self.claimed = np.zeros(n, bool)        # slot belongs to a group of g > 1
    self.groups: list[_Group] = []
    self.whole: list[list[int]] = [[] for _ in range(n)]

  @property
  def peak(self) -> float:
    return float(self.cost.max())

  def split_option(self, s: int, g: int, capacity: int, cost: CostModel,
                   join_only: bool = False):
    """The best place for a document needing a group of g: (rise of this micro-batch's
    busiest device, free tokens left on the devices it lands on, (group or None, slots,
    per-member cost)) or None. It may join a group already here of g or more devices
    (split finer, so it fills their room) or claim g free slots as a new group."""
    best = None
    for grp in self.groups:
      if grp.g < g:
        continue
      t = per_device_tokens(s, grp.g)
      if (self.used[grp.slots] + t > capacity).any():
        continue
      c = split_cost(s, grp.g, cost)
      rise = max(0.0, float((self.cost[grp.slots] + c).max()) - self.peak)
      opt = (rise, int((capacity - self.used[grp.slots] - t).sum()), (grp, grp.slots, c))
      best = opt if best is None or opt[:2] < best[:2] else best
    t = per_device_tokens(s, g)
    free = np.flatnonzero(~self.claimed & (self.used + t <= capacity))
    if len(free) >= g and not join_only:
      c = split_cost(s, g, cost)
      # The heaviest member onto the lightest slot.
      slots = free[np.argsort(self.cost[free], kind='stable')][:g]
      slots = slots[np.argsort(np.argsort(-c, kind='stable'), kind='stable')]
      rise = max(0.0, float((self.cost[slots] + c).max()) - self.peak)
      opt = (rise, int((capacity - self.used[slots] - t).sum()), (None, slots, c))
      best = opt if best is None or opt[:2] < best[:2] else best
    return best

  def short_option(self, s: int, c: float, capacity: int):
    ok = np.flatnonzero(self.used + s <= capacity)
    if not len(ok):
      return None
    rise = np.maximum(self.cost[ok] + c - self.peak, 0.0)
    room = capacity - self.used[ok] - s
    k = np.lexsort((ok, room, rise))[0]    # least rise, then best fit
    return float(rise[k]), int(room[k]), int(ok[k])

  def add_split(self, i: int, s: int, where) -> None:
    grp, slots, c = where
    if grp is None:
      grp = _Group(len(slots), slots)
      self.groups.append(grp)
      self.claimed[slots] = True
    grp.docs.append(i)
    self.used[slots] += per_device_tokens(s, grp.g)
    self.cost[slots] += c

  def add_short(self, i: int, s: int, c: float, slot: int) -> None:
    self.whole[slot].append(i)
    self.used[slot] += s
    self.cost[slot] += c

  def remove_short(self, i: int, s: int, c: float, slot: int) -> None:
    self.whole[slot].remove(i)
    self.used[slot] -= s
    self.cost[slot] -= c


def _relieve_peaks(fills: list[_Filling], lengths, capacity: int, cost: CostModel,
                   rounds: int = 4) -> None:
  """Local search on the lockstep sum: a whole document on a micro-batch's busiest device
  moves to any slot of another micro-batch where it fits without raising that one's busiest
  device, when this lowers the sum. Moves only lower the sum, so this stops."""
  for _ in range(rounds):
    moved = False
    for a in sorted(range(len(fills)), key=lambda a: -fills[a].peak):
      fa = fills[a]
      while True:
        d = int(np.argmax(fa.cost))
        second = float(np.sort(fa.cost)[-2]) if len(fa.cost) > 1 else 0.0
        best = None
        for i in fa.whole[d]:
          s, c = int(lengths[i]), cost.doc(int(lengths[i]))
          gain = min(c, fa.cost[d] - second)   # how far the peak falls
          for b, fb in enumerate(fills):
            if b == a:
              continue
            ok = np.flatnonzero((fb.used + s <= capacity) & (fb.cost + c <= fb.peak))
            if len(ok) and gain > 0 and (best is None or gain > best[0]):
              slot = int(ok[np.argmin(capacity - fb.used[ok])])
              best = (gain, i, s, c, b, slot)
        if best is None:
          break
        _, i, s, c, b, slot = best
        fa.remove_short(i, s, c, d)
        fills[b].add_short(i, s, c, slot)
        moved = True
    if not moved:
      return


def _lockstep_micro_batches(lengths, degrees, n: int, capacity: int, cost: CostModel
                            ) -> list[_Filling]:
  """Split documents first, then whole ones, each heaviest per-device cost first: it goes
  where it raises its micro-batch's busiest device least (ties: best fit in tokens, then the
  earliest micro-batch). A short document that fits no device whole is split over a group
  already open (the ring sends whole buffers anyway, so this costs no bytes). A micro-batch
  is opened only when the document fits no open one (first fit), so no micro-batch's first
  document would have fit an earlier one."""
  def per_device(i):
    s, g = int(lengths[i]), int(degrees[i])
    return split_cost(s, g, cost).max() if g > 1 else cost.doc(s)

  order = sorted(range(len(lengths)), key=lambda i: (degrees[i] == 1, -per_device(i),
                                                     -lengths[i], i))
  out: list[_Filling] = []
  for i in order:
    s, g = int(lengths[i]), int(degrees[i])
    c = cost.doc(s)
    best = None
    if g > 1:
      ways = [functools.partial(_Filling.split_option, s=s, g=g, capacity=capacity, cost=cost)]
    else:   # whole onto one device, else split over a group already open, else a new one
      ways = [functools.partial(_Filling.short_option, s=s, c=c, capacity=capacity),
              functools.partial(_Filling.split_option, s=s, g=2, capacity=capacity, cost=cost,
                                join_only=True)]
    for way in ways:
      for m, mb in enumerate(out):
        opt = way(mb)
        if opt is not None and (best is None or (opt[0], opt[1], m) < best[0]):
          best = ((opt[0], opt[1], m), opt[2])
      if best is not None:
        break
    if best is None:   # a new micro-batch only when no open one fits
      out.append(_Filling(n))
      opt = ways[0](out[-1])
      best = ((0.0, 0, len(out) - 1), opt[2])
    m, where = best[0][2], best[1]
    if isinstance(where, tuple):
      out[m].add_split(i, s, where)
    else:
      out[m].add_short(i, s, c, where)
  return out


def _place_in_pool(fills: list[_Filling], n: int) -> list[MicroBatch]:
  """Fixes each micro-batch's groups in the pool: largest group first (`canonical_layout`);
  groups of one size (and single devices) go, heaviest first, to the places whose running
  total over the step is lowest, so the per-device totals stay balanced too."""
  total = np.zeros(n)
  out = []
  for f in fills:
    in_group = np.zeros(n, bool)
    entries = []   # (g, member slots, split documents)
    for grp in f.groups:
      entries.append((grp.g, grp.slots, grp.docs))
      in_group[grp.slots] = True
    entries += [(1, np.array([d]), []) for d in range(n) if not in_group[d]]
    layout = canonical_layout(e[0] for e in entries)
    starts = np.cumsum((0,) + layout[:-1])
    groups: list[Unit | None] = [None] * len(layout)
    for g in sorted(set(layout)):
      places = [j for j, h in enumerate(layout) if h == g]
      mine = sorted((e for e in entries if e[0] == g), key=lambda e: -f.cost[e[1]].max())
      for e in mine:
        j = min(places, key=lambda j: (total[starts[j]:starts[j] + g].max(), j))
        places.remove(j)
        unit = Unit(g, [(i, -1) for i in e[2]])
        for m, d in enumerate(e[1]):
          unit.docs += [(i, m) for i in f.whole[d]]
        unit.used[:] = f.used[e[1]]
        unit.cost[:] = f.cost[e[1]]
        total[starts[j]:starts[j] + g] += unit.cost
        groups[j] = unit if unit.docs else None
    out.append(MicroBatch(layout, groups))
  return out


# ------------------------------------------------------------------ the plan

def plan(lengths: Sequence[int], num_devices: int, capacity: int, *,
         layouts: Sequence[int] = (1, 2, 4, 8), slack: float = 0.02,
         cost: CostModel = CostModel(), whole_groups: bool = False,
         mixed_layouts: bool = True) -> Plan:
  """The plan of one global batch from its document lengths (deterministic).

  mixed_layouts=True (default unless `whole_groups`): the lockstep planner, several group
  sizes per micro-batch. False: every micro-batch one group size, balancing per-device totals
  (Alg. 2 as written; what `whole_groups` plans use)."""
  if capacity % 2:
    raise ValueError(f'parallelism.hybrid_dp.capacity={capacity} must be even (zigzag halves)')
  layouts = check_layouts(layouts, num_devices)
  lengths = np.asarray(lengths, np.int64)
  if (lengths < 1).any():
    raise ValueError('hybrid_dp: every document needs at least one token')
  degrees = np.array([degree(int(s), capacity, layouts) for s in lengths], np.int64)
  units = _pack_long(lengths, degrees, capacity, cost, whole_groups)
  short = sorted(np.flatnonzero(degrees == 1), key=lambda i: (-lengths[i], i))
  load = np.zeros(num_devices)
  uniform = _balance_long(copy.deepcopy(units), num_devices, load)
  _place_short(short, lengths, capacity, cost, uniform, load, slack, whole_groups)
  out = Plan(num_devices, capacity, lengths, degrees,
             [MicroBatch(uniform_layout(mb.g, num_devices),
                         [u if u.docs else None for u in mb.groups]) for mb in uniform],
             whole_groups)
  if mixed_layouts and not whole_groups:
    fills = _lockstep_micro_batches(lengths, degrees, num_devices, capacity, cost)
    _relieve_peaks(fills, lengths, capacity, cost)
    micro = _place_in_pool(fills, num_devices)
    used = degrees.copy()   # a document may have joined a larger group than it needs
    for mb in micro:
      for u in mb.groups:
        for i, member in (u.docs if u is not None else []):
          used[i] = u.g if member < 0 else 1
    mixed = Plan(num_devices, capacity, lengths, used, micro, whole_groups)
    # The uniform plan is a candidate too, so the lockstep sum is never above it.
    score = lambda p: (round(p.lockstep_cost(), 12), len(p.micro_batches))
    out = min((mixed, out), key=score)
  return out


# ------------------------------------------------------------------ host buffers

def _doc_arrays(tokens: np.ndarray, seg: int, g: int, L: int | None = None
                ) -> dict[str, np.ndarray]:
  """One document as next-token rows, padded to L (default: a multiple of 2g; segment 0 =
  padding)."""
  s = len(tokens)
  L = padded_length(s, g) if L is None else L
  out = {k: np.zeros(L, np.int32) for k in FIELDS}
  out['inputs'][:s] = tokens
  out['targets'][:] = -1
  out['targets'][:s - 1] = tokens[1:]
  out['segment_ids'][:s] = seg
  out['positions'][:] = np.arange(L)
  return out


def device_buffers(micro: MicroBatch, docs: Sequence[np.ndarray], num_devices: int,
                   capacity: int, whole_groups: bool = False) -> dict[str, np.ndarray]:
  """int32 [num_devices, capacity] per field: device d's tokens in micro-batch `micro`. A
  document split over a group is cut into 2g pieces, member i holding pieces i and 2g-1-i
  (with `whole_groups`, pieces of capacity/2: the document padded to g x capacity)."""
  out = {k: np.zeros((num_devices, capacity), np.int32) for k in FIELDS}
  out['targets'][:] = -1
  for start, g, unit in zip(micro.starts, micro.layout, micro.groups):
    if unit is None:
      continue
    fill = np.zeros(g, np.int64)
    for seg, (i, member) in enumerate(unit.docs, start=1):
      split = member < 0
      d = _doc_arrays(np.asarray(docs[i]), seg, g if split else 1,
                      g * capacity if split and whole_groups else None)
      takes = _member_takes(len(d['inputs']), g if split else 1)
      for m, take in zip(range(g) if split else [member], takes):
        dev, f = start + m, fill[m]
        for k in FIELDS:
          out[k][dev, f:f + len(take)] = d[k][take]
        fill[m] += len(take)
  return out


def batch_buffers(p: Plan, docs: Sequence[np.ndarray]
                  ) -> list[tuple[int | tuple[int, ...], dict[str, np.ndarray]]]:
  """(layout key, buffers) per micro-batch, in execution order: the key is g when every group
  has g devices, else the layout tuple (`MicroBatch.key`)."""
  if len(docs) != len(p.lengths) or any(len(d) != s for d, s in zip(docs, p.lengths)):
    raise ValueError('hybrid_dp: documents do not match the lengths the plan was made from')
  return [(mb.key, device_buffers(mb, docs, p.num_devices, p.capacity, p.whole_groups))
          for mb in p.micro_batches]


def buffer_flops(buffers: dict[str, np.ndarray], cost: CostModel) -> np.ndarray:
  """Per-device FLOPs measured from the buffers themselves (not the plan's model): real tokens
  x linear + causal (query, key) pairs x pair cost, pairs counted at the query's device (ring
  attention computes the pairs of its local queries)."""
  real = buffers['segment_ids'] > 0
  pairs = np.where(real, buffers['positions'] + 1, 0).sum(axis=1)
  return cost.linear * real.sum(axis=1) + cost.pair * pairs
