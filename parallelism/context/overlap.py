"""Reads a compiled program (optimized HLO text) to show whether its collectives can overlap
compute, without a GPU (XLA:CPU runs collectives synchronously, so time cannot show it).

Two structural facts decide it (see the ring and TokenRing docstrings):
  * no collective inside a `conditional`: XLA cannot schedule it around the branch;
  * a send does not depend on the attention compute it is meant to hide under: walk its
    operands; "compute" is a dot/convolution/while/conditional/custom-call, or a fusion or
    call whose computation holds one (the blockwise kernel's loops, a Pallas call).
On XLA:GPU the same programs show `collective-permute-start` / `-done` pairs with compute
scheduled between them: `async_collectives` counts them and `async_pairs_with_compute` says
how many pairs have compute scheduled between start and done (`scripts/bench_gpu.py`).
"""

import dataclasses
import re

COLLECTIVES = ('collective-permute', 'all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all')
COMPUTE_OPS = ('dot', 'convolution', 'while', 'conditional', 'custom-call')

_HEAD = re.compile(r'^(ENTRY )?%?([\w.\-]+) .*\{\s*$')
_CALLED = re.compile(r'\b(?:to_apply|calls|body|condition|true_computation|false_computation)'
                     r'=%?([\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')


@dataclasses.dataclass
class Instr:
  name: str
  op: str
  operands: list[str]
  called: list[str]
  line: str


def _split_instr(line: str):
  """(name, op, operand text, attribute text) of one instruction line, or None."""
  m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = ', line)
  if not m:
    return None
  rest = line[m.end():]
  if rest.startswith('('):  # tuple type: skip to its closing parenthesis
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == '('
      depth -= ch == ')'
      if depth == 0:
        rest = rest[i + 1:]
        break
  else:
    rest = rest.split(' ', 1)[1] if ' ' in rest else ''
  m_op = re.match(r'\s*([\w\-]+)\(', rest)
  if not m_op:
    return None
  start = m_op.end()
  depth, end = 1, start
  while end < len(rest) and depth:
    depth += rest[end] == '('
    depth -= rest[end] == ')'
    end += 1
  return m.group(1), m_op.group(1), rest[start:end - 1], rest[end:]


def parse(hlo: str) -> tuple[dict[str, dict[str, Instr]], str]:
  """({computation: {instruction: Instr}}, entry computation name)."""
  comps, name, entry = {}, None, None
  for line in hlo.splitlines():
    head = _HEAD.match(line)
    if head and not line.startswith(' '):
      name = head.group(2)
      comps[name] = {}
      if head.group(1):
        entry = name
      continue
    if name is None or not line.startswith(' '):
      continue
    parts = _split_instr(line)
    if parts is None:
      continue
    iname, op, operands, attrs = parts
    called = _CALLED.findall(attrs)
    branches = _BRANCHES.search(attrs)
    if branches:
      called += [b.strip().lstrip('%') for b in branches.group(1).split(',') if b.strip()]
    comps[name][iname] = Instr(iname, op, re.findall(r'%([\w.\-]+)', operands), called, line)
  return comps, entry


def _is_collective(op: str) -> bool:
  return op.removesuffix('-start').removesuffix('-done') in COLLECTIVES


class Program:
  """One compiled program's HLO, with the queries the overlap tests ask."""

  def __init__(self, hlo: str):
    self.comps, self.entry = parse(hlo)
    self._holds_compute = {}

  def _reachable(self, roots):
    seen, todo = set(), list(roots)
    while todo:
      c = todo.pop()
      if c in seen or c not in self.comps:
        continue
      seen.add(c)
      for ins in self.comps[c].values():
        todo.extend(ins.called)
    return seen

  def collectives_in_conditionals(self) -> list[str]:
    """Collectives inside any branch of a conditional (directly or in what it calls)."""
    branches = [c for comp in self.comps.values() for ins in comp.values()
                if ins.op == 'conditional' for c in ins.called]
    return [f'{c}/{ins.name}' for c in self._reachable(branches)
            for ins in self.comps[c].values() if _is_collective(ins.op)]

  def holds_compute(self, comp: str) -> bool:
    if comp not in self._holds_compute:
      self._holds_compute[comp] = False  # (recursion guard)
      self._holds_compute[comp] = any(
          ins.op in COMPUTE_OPS or any(self.holds_compute(c) for c in ins.called)
          for ins in self.comps.get(comp, {}).values())
    return self._holds_compute[comp]

  def is_compute(self, ins: Instr) -> bool:
    if _is_collective(ins.op):
      return False
    return ins.op in COMPUTE_OPS or any(self.holds_compute(c) for c in ins.called)

  def ancestors(self, comp: str, name: str) -> set[str]:
    instrs, seen, todo = self.comps[comp], set(), list(self.comps[comp][name].operands)
    while todo:
      n = todo.pop()
      if n in seen or n not in instrs:
        continue
      seen.add(n)
      todo.extend(instrs[n].operands)
    return seen

  def sends(self, comp: str | None = None) -> list[tuple[str, Instr]]:
    """(computation, instruction) of every collective-permute (or its -start)."""
    comps = [comp] if comp else list(self.comps)
    return [(c, ins) for c in comps for ins in self.comps[c].values()
            if ins.op in ('collective-permute', 'collective-permute-start')]

  def depends_on_compute(self, comp: str, ins: Instr) -> bool:
    instrs = self.comps[comp]
    return any(self.is_compute(instrs[a]) for a in self.ancestors(comp, ins.name))

  def concurrent_compute(self, comp: str, ins: Instr) -> list[str]:
    """Compute instructions of the same computation that are neither ancestors nor
    descendants of `ins`: what a scheduler may run while the transfer is in flight."""
    instrs = self.comps[comp]
    ancestors = self.ancestors(comp, ins.name)
    return [n for n, other in instrs.items() if self.is_compute(other) and n not in ancestors
            and ins.name not in self.ancestors(comp, n)]

  def while_bodies(self) -> list[str]:
    return [re.search(r'body=%?([\w.\-]+)', ins.line).group(1)
            for comp in self.comps.values() for ins in comp.values() if ins.op == 'while']

  def async_collectives(self) -> dict[str, int]:
    """Counts of `<collective>-start` ops (async on GPU/TPU) and of synchronous ones."""
    counts = {}
    for comp in self.comps.values():
      for ins in comp.values():
        if _is_collective(ins.op) and not ins.op.endswith('-done'):
          counts[ins.op] = counts.get(ins.op, 0) + 1
    return counts

  def async_pairs_with_compute(self) -> tuple[int, int]:
    """(async collective start/done pairs, pairs with compute scheduled between the two): a
    compiled module prints each computation in its schedule's order."""
    pairs = overlapped = 0
    for comp in self.comps.values():
      names = list(comp)
      at = {n: i for i, n in enumerate(names)}
      for ins in comp.values():
        if not (ins.op.endswith('-done') and _is_collective(ins.op)):
          continue
        start = next((o for o in ins.operands if o in comp and comp[o].op.endswith('-start')),
                     None)
        if start is None:
          continue
        pairs += 1
        overlapped += any(self.is_compute(comp[n]) for n in names[at[start] + 1:at[ins.name]])
    return pairs, overlapped
