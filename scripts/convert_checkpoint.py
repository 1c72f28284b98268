"""Convert a universal checkpoint: another mesh, layer layout or dtype, parameters only, or an
.npz export. The work is done by checkpoint/convert.py.

    python scripts/convert_checkpoint.py --src runs/a/checkpoints --dst runs/b_ckpt \\
        --mesh fsdp=8 --layout scan [--step N] [--params-only] [--dtype bfloat16] [--dry-run]
    python scripts/convert_checkpoint.py --src runs/a/checkpoints --dst model.npz --export npz

Never modifies --src; refuses an existing --dst and a --dst inside --src. An --export without
--mesh/--devices reads on one device, whatever mesh wrote the checkpoint. Resume from the
result with --config.resume=<dst>, or start from its parameters with --config.init_from=<dst>.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--src', required=True, help='checkpoints directory (or a workdir holding one)')
  p.add_argument('--dst', required=True, help='new checkpoints directory (or .npz with --export)')
  p.add_argument('--step', type=int, default=None, help='source step (default: the latest)')
  mesh = p.add_mutually_exclusive_group()
  mesh.add_argument('--mesh', default=None, help='target mesh, e.g. data=2,fsdp=4')
  mesh.add_argument('--devices', type=int, default=None,
                    help="the source's mesh config resolved over N devices")
  p.add_argument('--params-only', action='store_true', help='drop the optimizer state')
  p.add_argument('--dtype', default=None, help='parameter dtype: float32 | bfloat16 | float16')
  p.add_argument('--layout', default=None, choices=('scan', 'unrolled'))
  p.add_argument('--export', default=None, choices=('npz',),
                 help='write one consolidated array per parameter instead of a checkpoint')
  p.add_argument('--dry-run', action='store_true',
                 help='print what would be written and the bytes per device; write nothing')
  p.add_argument('--no-progress', action='store_true')
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  from checkpoint import convert as convert_lib  # noqa: E402 - after the device count is set
  from training.program import build_program  # noqa: E402

  try:
    mesh = convert_lib.parse_mesh(args.mesh) if args.mesh else None
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  n = convert_lib.target_devices(mesh, args.devices)
  if n and 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
    # Only the CPU platform reads this: lets a CPU host lay the arrays out on the target mesh.
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={n}').strip()
  req = convert_lib.Request(src=args.src, dst=args.dst, step=args.step, mesh=mesh,
                            devices=args.devices, params_only=args.params_only, dtype=args.dtype,
                            layout=args.layout, export=args.export, dry_run=args.dry_run)
  try:
    convert_lib.convert(lambda c, m: build_program(c, m).setup, req,
                        progress=not args.no_progress)
  except (ValueError, FileExistsError, RuntimeError) as e:  # input: one line, status 2
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


def cli():
  """The console script (pyproject.toml): a user error is one line, status 2."""
  from training.safety.errors import run_cli
  run_cli(main)


if __name__ == '__main__':
  cli()
