"""Checkpoint save/restore throughput for a ~100M-parameter train state with AdamW moments, beside
the raw disk write speed measured in the same run.

    python scripts/bench_checkpoint.py [--layers 14] [--d-model 768] [--dir /tmp/bench_ckpt]

Rows: raw write (one file, fsync), async save (time until save() returns, and until the step is
committed), restore onto the same mesh, onto another mesh (resharded), and onto another mesh
with the layer layout converted (per-layer -> scanned stack, parameters and moments).
Convention: GB/s = bytes of the train state (params + mu + nu + counters) / wall seconds;
1 GB = 1e9 bytes. Restores read what was just written, so they are served from the page cache
where the OS kept it (this is not a cold-disk figure).
"""

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()


def parse_args(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument('--layers', type=int, default=14)
  p.add_argument('--d-model', type=int, default=768)
  p.add_argument('--mlp-dim', type=int, default=2048)
  p.add_argument('--vocab', type=int, default=16384)
  p.add_argument('--dir', default='/tmp/loomax_bench_ckpt')
  p.add_argument('--smoke', action='store_true', help='seconds-long check: a 2-layer d=32 model')
  return p.parse_args(argv)


if __name__ == '__main__':
  parse_args()  # --help and bad arguments answer here, before JAX's ~2 s import

import jax  # noqa: E402
import numpy as np  # noqa: E402

from checkpoint import metadata, universal  # noqa: E402
from checkpoint.manager import Checkpointer  # noqa: E402
from configs import base  # noqa: E402
from parallelism import mesh as mesh_lib  # noqa: E402
from training.program import build_program  # noqa: E402


def bench_config(args, **mesh):
  c = base.get_config()
  c.model.update(num_layers=args.layers, d_model=args.d_model, num_heads=12, num_kv_heads=4,
                 head_dim=args.d_model // 12, mlp_dim=args.mlp_dim, vocab_size=args.vocab)
  c.batch_size, c.seq_len = 8, 128
  for axis in mesh_lib.AXES:
    c.mesh[axis] = mesh.get(axis, 1)
  return c


def raw_write(path: str, nbytes: int) -> float:
  block = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()
  start = time.perf_counter()
  with open(path, 'wb') as f:
    left = nbytes
    while left > 0:
      f.write(block[:min(left, len(block))])
      left -= len(block)
    f.flush()
    os.fsync(f.fileno())
  elapsed = time.perf_counter() - start
  os.remove(path)
  return elapsed


def restore(directory, config, program):
  ckpt = Checkpointer(directory, read_only=True)
  start = time.perf_counter()
  state, _, _ = universal.restore_state(ckpt, ckpt.latest_step(), config, program.setup,
                                        program.mesh)
  jax.block_until_ready(state)
  return time.perf_counter() - start, state


def main():
  args = parse_args()
  if args.smoke:
    args.layers, args.d_model, args.mlp_dim, args.vocab = 2, 32, 64, 256
  shutil.rmtree(args.dir, ignore_errors=True)
  os.makedirs(args.dir)

  src_cfg = bench_config(args, fsdp=8)
  src = build_program(src_cfg, mesh_lib.make_mesh(src_cfg.mesh))
  state = src.init_state()
  # Fresh AdamW moments are zeros and compress to nothing; give them weight-like values so the
  # bytes on disk are those of a state mid-training.
  noisy = lambda x, k: x + 1e-3 * jax.random.normal(k, x.shape, x.dtype)
  state = jax.jit(lambda s: s.replace(opt_state=jax.tree.map(
      lambda x: noisy(x, jax.random.key(x.size)) if x.dtype == np.float32 else x, s.opt_state)),
      out_shardings=src.setup.shardings)(state)
  state = jax.block_until_ready(state)
  arrays = metadata.state_arrays(src.setup)
  nbytes = sum(i.nbytes for i in arrays.values())
  n_params = sum(int(np.prod(i.shape)) for p, i in arrays.items() if p.startswith('params/'))
  rows = []

  raw = raw_write(os.path.join(args.dir, 'raw.bin'), nbytes)
  rows.append(('raw disk write (fsync)', raw, '-'))

  ckpt = Checkpointer(os.path.join(args.dir, 'ckpt'), async_save=True)
  meta = metadata.describe(src_cfg, arrays, src.mesh)
  start = time.perf_counter()
  universal.save_state(ckpt, 1, state, meta, None, force=True)
  returned = time.perf_counter() - start
  ckpt.wait()
  committed = time.perf_counter() - start
  ckpt.close()
  rows.append(('async save: save() returns', returned, 'fsdp=8'))
  rows.append(('async save: step committed', committed, 'fsdp=8'))

  want = jax.tree.map(np.asarray, jax.device_get(state.params['embed']))
  for name, cfg in [('restore, same mesh', src_cfg),
                    ('restore, resharded', bench_config(args, data=2, fsdp=2, tensor=2)),
                    ('restore, resharded + scan layout',
                     bench_config(args, data=4, fsdp=2))]:
    if 'scan' in name:
      cfg.model.scan_layers = True
    program = build_program(cfg, mesh_lib.make_mesh(cfg.mesh))
    seconds, restored = restore(os.path.join(args.dir, 'ckpt'), cfg, program)
    got = jax.tree.map(np.asarray, jax.device_get(restored.params['embed']))
    assert all(np.array_equal(want[k], got[k]) for k in want), 'restore changed the data'
    rows.append((name, seconds, mesh_lib.describe(program.mesh)))
    del restored

  on_disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in
                os.walk(os.path.join(args.dir, 'ckpt')) for f in fs)
  dev = jax.devices()[0]
  print(f'# bench_checkpoint: backend={jax.default_backend()} device={dev.device_kind} '
        f'x{jax.device_count()} jax={jax.__version__}; model d={args.d_model} '
        f'layers={args.layers} mlp={args.mlp_dim} vocab={args.vocab}: {n_params / 1e6:.1f}M '
        f'params, state {nbytes / 1e9:.3f} GB (params + AdamW mu, nu; float32), '
        f'{on_disk / 1e9:.3f} GB on disk (zstd); GB/s = state bytes / wall s; written from '
        'fsdp=8; restores read from page cache')
  print(f'| {"operation":34s} | {"target mesh":38s} | {"seconds":>8s} | {"GB/s":>6s} |')
  print(f'|{"-" * 36}|{"-" * 40}|{"-" * 10}|{"-" * 8}|')
  for name, seconds, target in rows:
    print(f'| {name:34s} | {target:38s} | {seconds:8.2f} | {nbytes / 1e9 / seconds:6.2f} |')
  same, resh = rows[3][1], rows[4][1]
  print(f'summary: save {nbytes / 1e9 / committed:.2f} GB/s (raw disk {nbytes / 1e9 / raw:.2f} '
        f'GB/s), restore {nbytes / 1e9 / same:.2f} GB/s same mesh vs '
        f'{nbytes / 1e9 / resh:.2f} GB/s resharded')
  shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == '__main__':
  from training.safety.errors import run_cli
  run_cli(main)
