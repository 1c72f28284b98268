"""Where a compiled step spends its time: a jax.profiler trace, attributed to op categories.

XLA:CPU records one trace event per executed thunk, carrying the HLO instruction's name
(`hlo_op`). We parse the trace (jax.profiler.ProfileData over the xplane.pb), look each event's
instruction up in the compiled module's optimized HLO text, and put it in one category by its
opcode, the opcodes fused into it and the JAX name scope in its `op_name` metadata (the model
marks attention, loss and optimizer with the scopes below). Control-flow thunks (while, call,
conditional) are not counted themselves: the thunks they run are.

Times are summed op durations over all threads; intra-op parallel work can make the sum exceed
the wall time, so shares (not absolute sums) are the figure to compare.
"""

import collections
import glob
import os
import re
import tempfile
import time
from typing import Callable

import jax

from modeling.scopes import ATTENTION_SCOPE, LOSS_SCOPE, OPTIMIZER_SCOPE

CATEGORIES = ('matmul', 'attention', 'layout', 'elementwise', 'loss', 'optimizer', 'collectives',
              'other')
DESCRIPTIONS = {
    'matmul': 'projection/MLP/head matmuls (dot fusions outside attention)',
    'attention': 'attention core: QK^T, PV, mask and softmax',
    'layout': 'layout copies, transposes, concatenates (pure data movement)',
    'elementwise': 'elementwise ops and norms (RMSNorm, SwiGLU, rotary, residuals)',
    'loss': 'cross-entropy over the logits (logsumexp, target gather)',
    'optimizer': 'gradient clipping and AdamW update',
    'collectives': 'all-reduce / all-gather / reduce-scatter / permute / all-to-all',
    'other': 'anything else (rng, scalar bookkeeping)',
}

_CONTROL = {'while', 'call', 'conditional'}
_DOTS = {'dot', 'convolution'}
_MOVES = {'copy', 'transpose', 'concatenate', 'pad', 'slice', 'dynamic-slice',
          'dynamic-update-slice', 'reverse', 'gather', 'scatter'}
_NO_WORK = {'bitcast', 'reshape', 'broadcast', 'parameter', 'constant', 'tuple',
            'get-tuple-element', 'iota'}
_COLLECTIVE_OPS = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute',
                   'all-to-all')

_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.+?\s([a-z][a-z0-9\-]*)\((.*)$')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def parse_hlo(hlo_text: str) -> dict[str, dict]:
  """Instruction name -> {opcode, op_name, computation, calls} for every instruction."""
  out, computation = {}, None
  for line in hlo_text.splitlines():
    if not line.startswith(' ') and (m := _COMPUTATION.match(line)):
      computation = m.group(1)
      continue
    if m := _INSTRUCTION.match(line):
      name, opcode, rest = m.groups()
      calls = _CALLS.search(rest)
      op_name = _OP_NAME.search(rest)
      out[name] = {'opcode': opcode, 'op_name': op_name.group(1) if op_name else '',
                   'computation': computation, 'calls': calls.group(1) if calls else None}
  return out


def _by_computation(instructions: dict[str, dict]) -> dict[str, list[dict]]:
  comps = collections.defaultdict(list)
  for info in instructions.values():
    comps[info['computation']].append(info)
  return comps


def categorize(name: str, instructions: dict[str, dict],
               comps: dict[str, list[dict]] | None = None) -> str:
  """One category of CATEGORIES for an HLO instruction, or 'control' (not counted)."""
  comps = comps if comps is not None else _by_computation(instructions)
  info = instructions.get(name)
  if info is None:
    return 'other'
  opcode = info['opcode']
  if opcode in _CONTROL:
    return 'control'
  if any(opcode.startswith(c) for c in _COLLECTIVE_OPS):
    return 'collectives'
  inner = [info]
  if opcode == 'fusion' and info['calls']:
    inner = comps.get(info['calls'], [])  # one level: fusions do not nest on CPU in practice
  opcodes = {i['opcode'] for i in inner}
  names = ' '.join([info['op_name']] + [i['op_name'] for i in inner])
  if opcodes <= (_MOVES | _NO_WORK) and opcodes & _MOVES:
    return 'layout'  # pure data movement, attention's head transposes included
  if ATTENTION_SCOPE in names:
    return 'attention'
  if opcodes & _DOTS or (opcode == 'custom-call' and 'matmul' in name.lower()):
    return 'matmul'
  if LOSS_SCOPE in names:
    return 'loss'
  if OPTIMIZER_SCOPE in names:
    return 'optimizer'
  if opcodes <= _NO_WORK:
    return 'layout'
  if opcodes & {'rng', 'rng-bit-generator', 'rng-get-and-update-state'}:
    return 'other'
  return 'elementwise'


def trace_op_times(trace_dir: str) -> dict[str, float]:
  """Seconds per HLO instruction name summed over a trace's XLA:CPU thunk events."""
  from jax.profiler import ProfileData
  files = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)
  if not files:
    raise RuntimeError(f'no xplane.pb trace under {trace_dir}')
  times: dict[str, float] = collections.defaultdict(float)
  for path in files:
    data = ProfileData.from_file(path)
    for plane in data.planes:
      for line in plane.lines:
        for event in line.events:
          stats = dict(event.stats)
          if 'hlo_op' in stats:
            times[str(stats['hlo_op'])] += event.duration_ns * 1e-9
  return dict(times)


def breakdown(op_times: dict[str, float], hlo_text: str) -> dict[str, float]:
  """Seconds per category (CATEGORIES) from per-instruction seconds."""
  instructions = parse_hlo(hlo_text)
  comps = _by_computation(instructions)
  out = {c: 0.0 for c in CATEGORIES}
  for name, seconds in op_times.items():
    if name not in instructions:
      continue  # another module's thunk (e.g. a helper computation) in the same trace
    cat = categorize(name, instructions, comps)
    if cat != 'control':
      out[cat] += seconds
  return out


def profile_steps(run_step: Callable[[], None], hlo_text: str, steps: int,
                  next_batch: Callable[[], None] | None = None, top_n: int = 12) -> dict:
  """Traces `steps` calls of `run_step` (which must block) and returns the breakdown.

  `next_batch`, when given, is called before each step and timed as host/data wait.
  Returns {'seconds': {category: s per step}, 'op_seconds': total op s per step,
  'wall_seconds': wall s per step, 'data_seconds': data wait s per step, 'source': ...}.
  """
  run_step()  # warm: nothing below includes compilation
  trace_dir = tempfile.mkdtemp(prefix='loomax_profile_')
  data_s = 0.0
  with jax.profiler.trace(trace_dir):
    t0 = time.perf_counter()
    for _ in range(steps):
      if next_batch is not None:
        d0 = time.perf_counter()
        next_batch()
        data_s += time.perf_counter() - d0
      run_step()
    wall = time.perf_counter() - t0
  per_op = trace_op_times(trace_dir)
  cats = breakdown(per_op, hlo_text)
  instructions = parse_hlo(hlo_text)
  comps = _by_computation(instructions)
  top = sorted(((s, n) for n, s in per_op.items() if n in instructions), reverse=True)[:top_n]
  top_ops = [{'name': n, 'ms_per_step': s / steps * 1e3,
              'category': categorize(n, instructions, comps),
              'op_name': instructions[n]['op_name']} for s, n in top]
  total = sum(cats.values())
  if total <= 0:
    raise RuntimeError('the trace holds no XLA op events of this step (profiler backend without '
                       'per-op events?)')
  return {'seconds': {k: v / steps for k, v in cats.items()}, 'op_seconds': total / steps,
          'wall_seconds': wall / steps, 'data_seconds': data_s / steps, 'top_ops': top_ops,
          'source': 'jax.profiler trace (XLA thunk events) x optimized HLO opcodes/op_name'}


def format_breakdown(result: dict) -> list[str]:
  """Table lines: category, ms per step, share of op time, what it holds."""
  total = result['op_seconds']
  lines = [f'# op-time breakdown from {result["source"]}',
           f'{"category":<12} {"ms/step":>9} {"share":>7}  holds']
  for cat in CATEGORIES:
    s = result['seconds'][cat]
    lines.append(f'{cat:<12} {s * 1e3:>9.2f} {s / total:>7.1%}  {DESCRIPTIONS[cat]}')
  lines.append(f'{"ops total":<12} {total * 1e3:>9.2f} {1:>7.0%}  summed over threads')
  lines.append(f'{"host/data":<12} {result["data_seconds"] * 1e3:>9.2f} {"":>7}  '
               'waiting for the next batch (outside the step)')
  lines.append(f'{"step wall":<12} {result["wall_seconds"] * 1e3:>9.2f} {"":>7}  '
               'wall time per step while tracing')
  if result.get('top_ops'):
    lines.append('# slowest instructions: ms/step, category, name, op_name')
    for op in result['top_ops']:
      lines.append(f'  {op["ms_per_step"]:9.2f}  {op["category"]:<11} {op["name"]:<28} '
                   f'{op["op_name"][:90]}')
  return lines


# Named benchmark shapes (`--shape` of scripts/bench_train.py and scripts/profile_step.py).
SHAPES = {
    # The issue-19 shape: 2 layers, d=384, 6 query heads x 64 (3 K/V heads, GQA 2 as in the
    # tiny config), SwiGLU 1024, vocab 8192, seq 512, batch 8.
    'd384': {'model.num_layers': 2, 'model.d_model': 384, 'model.num_heads': 6,
             'model.num_kv_heads': 3, 'model.head_dim': 64, 'model.mlp_dim': 1024,
             'model.vocab_size': 8192, 'seq_len': 512, 'batch_size': 8},
    # Seconds-long settings for the scripts' --smoke tests.
    'smoke': {'model.num_layers': 1, 'model.d_model': 64, 'model.num_heads': 2,
              'model.num_kv_heads': 1, 'model.head_dim': 32, 'model.mlp_dim': 128,
              'seq_len': 32, 'batch_size': 2},
}


def apply_shape(config, name: str):
  """Overrides `config` keys with the named shape ('' = unchanged)."""
  if not name:
    return config
  if name not in SHAPES:
    raise ValueError(f'--shape={name!r}; valid: {sorted(SHAPES)}')
  for key, value in SHAPES[name].items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config
