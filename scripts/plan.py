"""Plans a run's parallelism: the mesh, the context strategy and the memory settings for a
model, a sequence length and a machine, ranked by modelled step time (docs/planning.md).

    python scripts/plan.py --config configs/tiny.py --devices 8 --device_memory_gib 0.5 \
        --seq_len 4096 --global_batch_tokens 32768 --hardware cpu [--config.KEY=VAL ...]
    python scripts/plan.py --calibrate --json profile.json      # measure this machine

Each row: the candidate, its modelled step time split into compute / recompute / exposed
communication, per-device memory (modelled, and compiled where this process has the devices:
with --hardware cpu and fake devices, --fake_devices N compiles on N fake CPU devices), MFU,
and the train.py overrides to paste. With --doc_lengths, the data's document lengths are
planned for: hybrid data parallelism joins the candidates.
"""

import argparse
import ast
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--config', default='configs/tiny.py', help='experiment config file')
  ap.add_argument('--devices', type=int, default=8, help='devices to plan for')
  ap.add_argument('--device_memory_gib', type=float, default=0.0,
                  help='memory per device (0 = the hardware profile\'s)')
  ap.add_argument('--seq_len', type=int, default=0, help='tokens per sequence (0 = config)')
  ap.add_argument('--global_batch_tokens', type=int, default=0,
                  help='tokens per optimizer step (0 = config batch_size x seq_len)')
  ap.add_argument('--hardware', default='h100',
                  help='h100 | h200 | tpu-v5p | cpu | a profile JSON | '
                       'custom:PEAK_TFLOPS,HBM_GBPS,LINK_GBPS')
  ap.add_argument('--compile', choices=('auto', 'never', 'always'), default='auto',
                  help='compile the leading candidates (auto: when this process has the devices)')
  ap.add_argument('--fake_devices', type=int, default=0,
                  help='start N fake CPU devices to compile on (CPU figures, see docs)')
  ap.add_argument('--top', type=int, default=5, help='compiled candidates that fit, at most')
  ap.add_argument('--rows', type=int, default=10, help='rows printed')
  ap.add_argument('--calibrate', action='store_true',
                  help="measure this machine's profile (peak, attention, links) and print it")
  ap.add_argument('--calibrate_kernels', action='store_true',
                  help="before planning, measure the matmul, attention (per head layout) and "
                       "scan speeds at this workload's shapes on one local device of the "
                       "target's backend (training/calibration.calibrate_workload), and, "
                       "where this process has --devices of them, each context-parallel "
                       "(context, tensor) split (calibrate_layouts)")
  ap.add_argument('--doc_lengths', default='',
                  help='the data\'s document lengths: a file of integers (.npy or text), '
                       'data (the configured corpus), lognormal:MEDIAN,SIGMA or '
                       'pareto:SCALE,SHAPE. Static meshes are then charged the attention '
                       'their busiest device does with one step of such documents, and hybrid '
                       'data parallelism joins the candidates (a document data.source only)')
  ap.add_argument('--json', default='', help='also write the plan (or profile) to this JSON')
  args, rest = ap.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith('--config.')]
  if bad:
    ap.error(f'unrecognized arguments: {" ".join(bad)}')
  return args, rest


def apply_overrides(config, overrides):
  """--config.KEY=VALUE strings onto `config`, each value parsed as its key's type."""
  from training import overrides as overrides_lib
  for arg in overrides:
    key, _, text = arg[len('--config.'):].partition('=')
    message = overrides_lib.unknown_key(config, key)
    if message:
      raise SystemExit(f'plan.py: error: {message}')
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    old = node[leaf]
    if isinstance(old, str):
      value = text
    else:
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        raise SystemExit(f'plan.py: error: --config.{key}={text!r} is not a {type(old).__name__}')
    node[leaf] = value
  return config


def main(argv=None):
  args, rest = parse_args(argv)
  if args.fake_devices:
    os.environ['JAX_PLATFORMS'] = 'cpu'
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={args.fake_devices}')
  import jax
  import numpy as np
  from parallelism.planner import hardware as hw_lib
  from training import autoplan, calibration, overrides as overrides_lib

  if args.calibrate:
    hw = calibration.calibrate()
    text = json.dumps(hw_lib.dataclasses.asdict(hw), indent=1)
    print(text)
    if args.json:
      hw_lib.save(hw, args.json)
    return 0
  try:
    hw = hw_lib.parse(args.hardware)
  except ValueError as e:
    raise SystemExit(f'plan.py: error: {e}')
  config = apply_overrides(overrides_lib.load_config_file(args.config), rest)
  seq_len = args.seq_len or config.seq_len
  tokens = args.global_batch_tokens or config.batch_size * seq_len
  memory = args.device_memory_gib * hw_lib.GIB or hw.memory_bytes
  try:
    if args.calibrate_kernels:
      hw = calibration.calibrate_workload(hw, config, devices=args.devices, seq_len=seq_len)
      if len(jax.devices()) >= args.devices:
        hw = calibration.calibrate_layouts(hw, config, devices=args.devices, seq_len=seq_len)
    lengths = None
    if args.doc_lengths:
      from parallelism.planner import documents
      lengths = documents.parse_lengths(args.doc_lengths,
                                        corpus=lambda: autoplan.corpus_lengths(config))
    rows = autoplan.plan(config, devices=args.devices, memory_bytes=memory, seq_len=seq_len,
                         global_tokens=tokens, hw=hw, compile=args.compile, top=args.top,
                         doc_lengths=lengths)
  except ValueError as e:
    raise SystemExit(f'plan.py: error: {e}')
  docs = (f'; documents {args.doc_lengths} (median {int(np.median(lengths))}, longest '
          f'{int(lengths.max())} tokens)' if lengths is not None else '')
  print(f'{config.model.name} at {seq_len} tokens x {tokens // seq_len} rows on '
        f'{args.devices} x {hw.name} ({memory / hw_lib.GIB:.2f} GiB each){docs}; {len(rows)} '
        f'candidates, {sum(r.feasible for r in rows)} fit')
  print(f'{"#":>2} {"candidate":<52} {"step s":>9} {"compute":>9} {"recomp":>8} {"comm":>8} '
        f'{"MiB model":>9} {"MiB comp":>9} {"MFU":>6}  checked')
  for i, r in enumerate(rows[:args.rows]):
    t, e = r.estimate.time, r.estimate
    comp = f'{r.compiled_bytes / 2**20:9.1f}' if r.compiled_bytes is not None else f'{"-":>9}'
    print(f'{i:>2} {r.candidate.describe():<52} {t["step"]:9.4g} {t["compute"]:9.4g} '
          f'{t["recompute"]:8.3g} {t["communication"]:8.3g} '
          f'{e.memory["total"] / 2**20:9.1f} {comp} {e.mfu:6.1%}  '
          f'{r.checked}{"" if r.feasible else " (does not fit)"}'
          f'{": " + r.refused if r.refused else ""}')
  if rows and rows[0].feasible:
    print(f'\nfirst choice: {autoplan.flags(rows[0].candidate)}')
  else:
    print('\nno candidate fits: lower the batch or the length, or add devices')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'hardware': hw_lib.dataclasses.asdict(hw), 'devices': args.devices,
                 'memory_bytes': memory, 'seq_len': seq_len, 'global_tokens': tokens,
                 'rows': [{'candidate': r.candidate.describe(),
                           'overrides': r.candidate.overrides(), 'time': r.estimate.time,
                           'memory': r.estimate.memory, 'mfu': r.estimate.mfu,
                           'compiled_bytes': r.compiled_bytes, 'checked': r.checked,
                           'refused': r.refused, 'feasible': r.feasible} for r in rows]},
                f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
