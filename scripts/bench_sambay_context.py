"""SambaY under context parallelism: per-device memory and bytes moved, by kind.

    python scripts/bench_sambay_context.py                   # 65,536 tokens, context 1 vs 8
    python scripts/bench_sambay_context.py --smoke           # 1,024 tokens, bytes rows only
    python scripts/bench_sambay_context.py --json out.json

Compile only (nothing executes), on fake CPU devices, float32, batch 1, one sequence per step.
Model: SambaY, 16 layers (Mamba x4 + the memory Mamba, SWA x4, one full-attention layer whose
K/V the three cross-attention layers read, GMU x3), d 128, 2 query heads x 64 over 1 kv head,
SwiGLU 512, window 128, d_state 16, d_conv 4, chunked scan (64), remat full, blockwise
attention, chunked loss; parameters sharded over (fsdp, context). Context parallel runs use
the ring with the zigzag layout.

  memory     per-device memory of the compiled train step (memory_analysis: temp + args +
             outputs - aliased), context 1 and context N
  bytes      bytes one device sends per step, from the optimized HLO of each op alone (forward
             + backward), with `bench_context.collective_bytes_per_device` (while loops x their
             trip counts); mean over devices:
               scan summaries  all-gather of the piece summaries + its reduce-scatter
               segment halo    the predecessor's last segment id (part of the scan op)
               conv halo       the predecessor's last d_conv-1 conv inputs
               window hand-off the one-hop K/V halo of a window layer (and, beside it, what
                               the ring would send for that layer)
               shared KV       one gather of the full layer's K/V serving every
                               cross-attention layer (and the ring per cross layer instead)
             next to the dense model's ring K/V bytes per layer (same heads, same length),
             and the whole SambaY train step's bytes (everything, parameters included).
"""

import argparse
import json
import os
import re
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--seq_len', type=int, default=65536)
  ap.add_argument('--context', type=int, default=8)
  ap.add_argument('--smoke', action='store_true',
                  help='1,024 tokens, context 4, 4 layers, no train-step compilations: '
                       'a quick check of the bytes rows')
  ap.add_argument('--json', default='', help='also write the results to this path')
  return ap.parse_args(argv)


if __name__ == '__main__':
  parse_args()  # --help and bad arguments answer here, before JAX's ~2 s import

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from configs import sambay_tiny  # noqa: E402
from modeling import sambay, ssm  # noqa: E402
from modeling.attention import self_attention_kwargs  # noqa: E402
from parallelism import mesh as mesh_lib  # noqa: E402
from parallelism.context import make_context_attend  # noqa: E402
from scripts.bench_context import collective_bytes_per_device  # noqa: E402
from training import composition  # noqa: E402
from training.metrics import perf
from training.program import build_program  # noqa: E402

MiB = 2 ** 20


def bench_config(seq_len: int, context: int, smoke: bool):
  c = sambay_tiny.get_config()
  c.seq_len, c.batch_size = seq_len, 1
  m = c.model
  m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 128, 2, 1, 64, 512
  m.vocab_size, m.num_layers = 256, 4 if smoke else 16   # smoke: no cross-decoder layers
  m.sambay.window = 16 if smoke else 128
  m.sambay.scan_chunk = 64
  m.remat = 'full'
  a = c.attention
  a.impl = 'blockwise'
  a.block_q = a.block_kv = 64 if smoke else 1024
  a.loss_chunk = 256 if smoke else 4096
  c.mesh.data, c.mesh.fsdp, c.mesh.context, c.mesh.tensor = 1, 1, context, 1
  c.parallelism.context_impl = 'ring' if context > 1 else 'none'
  c.parallelism.rules = tuple((n, ('fsdp', 'context')) if n == 'embed' else (n, ax)
                              for n, ax in c.parallelism.rules)
  return c


def _mesh(c):
  return mesh_lib.make_mesh(c.mesh, jax.devices()[:c.mesh.context])


def _arg(mesh, shape, spec, dtype=np.float32):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _sent(compiled, n: int) -> float:
  return float(collective_bytes_per_device(compiled.as_text(), n).mean())


def _drop_permutes(hlo: str) -> str:
  return '\n'.join(l for l in hlo.splitlines()
                   if not re.search(r' collective-permute(-start|-done)?\(', l))


def scan_bytes(c, mesh) -> dict:
  """(summaries, segment halo) of one Mamba layer's scan, and its conv halo."""
  rec = composition.make_recurrence(c, mesh)
  n, L = c.mesh.context, c.seq_len
  E, N, W, _ = ssm.dims(c.model)
  x_spec = P(None, 'context', None)
  x = _arg(mesh, (1, L, E), x_spec)
  bn = _arg(mesh, (1, L, N), x_spec)
  seg = _arg(mesh, (1, L), P(None, 'context'), np.int32)
  A = _arg(mesh, (E, N), P())
  w, b = _arg(mesh, (W, E), P()), _arg(mesh, (E,), P())

  def scan_loss(x, dt, A, B_, C_, seg):
    return rec.scan(x, dt, A, B_, C_, segment_ids_BL=seg)[0].sum()

  def conv_loss(x, w, b, seg):
    return rec.conv(x, w, b, seg).sum()

  scan_prog = jax.jit(jax.grad(scan_loss, (0, 1, 2, 3, 4))).lower(x, x, A, bn, bn, seg).compile()
  conv_prog = jax.jit(jax.grad(conv_loss, (0, 1, 2))).lower(x, w, b, seg).compile()
  hlo = scan_prog.as_text()
  total = float(collective_bytes_per_device(hlo, n).mean())
  summaries = float(collective_bytes_per_device(_drop_permutes(hlo), n).mean())
  return {'scan_summaries': summaries, 'segment_halo': total - summaries,
          'conv_halo': _sent(conv_prog, n)}


def attention_bytes(c, mesh, window: int) -> dict:
  """One layer's attention (fwd + bwd) through the runtime's attend (window: the one-hop
  halo) and through the plain context ring."""
  m, L = c.model, c.seq_len
  spec = P(None, 'context', None, None)
  q = _arg(mesh, (1, L, m.num_heads, m.head_dim), spec)
  kv = _arg(mesh, (1, L, m.num_kv_heads, m.head_dim), spec)
  ids = _arg(mesh, (1, L), P(None, 'context'), np.int32)
  out = {}
  for name, attend in (('runtime', composition.make_attend(c, mesh)),
                       ('ring', make_context_attend(c, mesh, composition.make_block_kernel(c)))):
    def loss(q, k, v, seg, pos, attend=attend):
      return attend(q, k, v, causal=True, window=window,
                    **self_attention_kwargs(seg, pos)).sum()
    out[name] = _sent(jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, kv, kv, ids, ids).compile(),
                      c.mesh.context)
  return out


def shared_kv_bytes(c, mesh, readers: int) -> float:
  """One gather of the shared K/V and `readers` cross-attention layers reading it."""
  shared = composition.make_shared_kv(c, mesh)
  m, L = c.model, c.seq_len
  spec = P(None, 'context', None, None)
  q = _arg(mesh, (readers, 1, L, m.num_heads, m.head_dim), P(None, *spec))
  kv = _arg(mesh, (1, L, m.num_kv_heads, m.head_dim), spec)
  ids = _arg(mesh, (1, L), P(None, 'context'), np.int32)

  def loss(qs, k, v, seg, pos):
    k, v, kseg, kpos = shared.gather(k, v, seg, pos)
    return sum(shared.attend(qs[i], k, v, q_segment_ids=seg, kv_segment_ids=kseg,
                             q_positions=pos, kv_positions=kpos, causal=True).sum()
               for i in range(readers))

  prog = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, kv, kv, ids, ids).compile()
  return _sent(prog, c.mesh.context)


def train_step(c) -> tuple[float, float]:
  """(per-device compiled memory, bytes per device per step) of the SambaY train step."""
  program = build_program(c, _mesh(c))
  compiled = program.compiled_train_step()
  return perf.compiled_memory_bytes(compiled), _sent(compiled, c.mesh.context)


def run(seq_len: int, context: int, smoke: bool) -> dict:
  """Every row; the smoke run skips the two train-step compilations (memory and the whole
  step's bytes), the slow part, and reports those as None."""
  c1, cn = bench_config(seq_len, 1, smoke), bench_config(seq_len, context, smoke)
  mesh = _mesh(cn)
  roles = sambay.layer_roles(cn.model.num_layers)
  count = {r: roles.count(r) for r in set(roles)}
  count.setdefault(sambay.CROSS, 0)
  mamba_layers = count[sambay.MAMBA] + count[sambay.MEMORY]
  mem1, _ = (None, None) if smoke else train_step(c1)
  memn, step_bytes = (None, None) if smoke else train_step(cn)
  scan = scan_bytes(cn, mesh)
  window = attention_bytes(cn, mesh, cn.model.sambay.window)
  full = attention_bytes(cn, mesh, 0)   # a causal full-attention layer: the dense ring's cost
  readers = count.get(sambay.CROSS, 0)
  shared = shared_kv_bytes(cn, mesh, max(readers, 1))   # (smoke: 1 reader, to run the path)
  dense_ring = full['ring']
  per_layer = scan['scan_summaries'] + scan['segment_halo'] + scan['conv_halo']
  return {
      'seq_len': seq_len, 'context': context, 'layers': dict(sorted(count.items())),
      'memory_bytes': {'context_1': mem1, f'context_{context}': memn,
                       'ratio': None if smoke else memn / mem1},
      'bytes_per_device_per_layer': {
          **scan, 'window_handoff': window['runtime'], 'window_via_ring': window['ring'],
          'dense_ring_kv': dense_ring},
      'bytes_per_device_per_step': {
          'scan_summaries': mamba_layers * scan['scan_summaries'],
          'segment_halo': mamba_layers * scan['segment_halo'],
          'conv_halo': mamba_layers * scan['conv_halo'],
          'window_handoff': count[sambay.SWA] * window['runtime'],
          'shared_kv_once': shared,
          'shared_kv_readers': max(readers, 1),
          'shared_kv_if_ring_per_reader': max(readers, 1) * dense_ring,
          'full_layer_ring': count[sambay.FULL] * dense_ring,
          'sambay_train_step_total': step_bytes,   # None in the smoke run
          'dense_ring_kv_all_layers': cn.model.num_layers * dense_ring},
      'scan_and_halo_per_layer_vs_dense_ring': per_layer / dense_ring,
  }


def print_table(r: dict) -> None:
  n, mem = r['context'], r['memory_bytes']
  print(f"# bench_sambay_context | {r['seq_len']:,} tokens | context {n} (ring, zigzag) | "
        f"jax {jax.__version__} | compile only, float32 | layers {r['layers']}")
  if mem['ratio'] is None:
    print('memory per device: not measured (--smoke)')
  else:
    print(f"memory per device: context 1 {mem['context_1'] / MiB:,.1f} MiB, context {n} "
          f"{mem[f'context_{n}'] / MiB:,.1f} MiB, ratio {mem['ratio']:.3f}")
  print(f"{'bytes per device, KiB':32} {'per layer':>14} {'per step':>14}")
  lay, step = r['bytes_per_device_per_layer'], r['bytes_per_device_per_step']
  rows = [('scan summaries', 'scan_summaries', 'scan_summaries'),
          ('segment-id halo', 'segment_halo', 'segment_halo'),
          ('conv halo', 'conv_halo', 'conv_halo'),
          ('window hand-off (one hop)', 'window_handoff', 'window_handoff'),
          ('window layer via ring', 'window_via_ring', None),
          (f"shared KV once, {step['shared_kv_readers']} reader(s)", None, 'shared_kv_once'),
          ('shared KV, a ring per reader', None, 'shared_kv_if_ring_per_reader'),
          ('full-attention layer (ring)', 'dense_ring_kv', 'full_layer_ring'),
          ('sambay train step (all)', None, 'sambay_train_step_total'),
          ('dense ring K/V (all layers)', 'dense_ring_kv', 'dense_ring_kv_all_layers')]
  fmt = lambda v: f'{v / 1024:14,.1f}' if v is not None else f'{"":>14}'
  for label, a, b in rows:
    print(f'{label:32} {fmt(lay.get(a) if a else None)} {fmt(step.get(b) if b else None)}')
  print('(KiB: bytes / 1024; the whole step adds parameter gathers and gradient reductions)')
  print(f"scan summaries + halos per Mamba layer / dense ring K/V per layer: "
        f"{r['scan_and_halo_per_layer_vs_dense_ring']:.4%}")


def main(argv=None):
  args = parse_args(argv)
  jax.config.update('jax_default_matmul_precision', 'highest')
  seq_len, context = (1024, 4) if args.smoke else (args.seq_len, args.context)
  result = run(seq_len, context, args.smoke)
  print_table(result)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == '__main__':
  from training.safety.errors import run_cli
  run_cli(main)
