"""Per-mesh cost of one train step on 8 devices: tokens/s, per-device params + optimizer bytes,
compiled per-device memory and bytes sent by collectives (from the optimized HLO).

    python scripts/bench_sharding.py [--config configs/tiny.py] [--config.KEY=VAL ...]

On fake CPU devices (set below) the 8 devices share the host's cores: time shows
partitioning overhead, not scaling; memory and bytes are exact.
"""

import os
import sys

if 'jax' not in sys.modules:
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

# JAX and training/ are imported inside the functions, after absl has parsed the flags, so
# --help answers without JAX's ~2 s import.

config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Experiment config.')
flags.DEFINE_integer('steps', 5, 'Timed steps (median reported).')
flags.DEFINE_bool('smoke', False, 'Seconds-long check: a 1-layer d=32 model, two meshes, 1 step.')

MESHES = [dict(data=8), dict(fsdp=8), dict(data=2, fsdp=4), dict(data=2, fsdp=2, tensor=2),
          dict(fsdp=4, tensor=2), dict(tensor=8)]


def _synthetic(c):
  c = c.copy_and_resolve_references()
  c.data.source = 'synthetic'
  return c


def shrink_for_smoke(c):
  """--smoke: a 1-layer d=32 model on 8 x 32-token rows, a seconds-long check."""
  c.model.update(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64)
  c.batch_size, c.seq_len = 8, 32


def state_bytes_per_device(state) -> int:
  import jax

  return sum(x.addressable_shards[0].data.nbytes
             for x in jax.tree.leaves((state.params, state.opt_state)))


def main(_):
  import jax

  from parallelism import mesh as mesh_lib
  from training import data as data_lib
  from training.metrics import perf
  from training.program import build_program

  absl_logging.set_verbosity(absl_logging.WARNING)
  c = flags.FLAGS.config
  meshes = MESHES
  if flags.FLAGS.smoke:
    shrink_for_smoke(c)
    meshes, flags.FLAGS.steps = [MESHES[0], MESHES[3]], 1
  dev = jax.devices()[0]
  n = len(jax.devices())
  print(f'# bench_sharding | {dev.platform} {dev.device_kind} x{n} | jax {jax.__version__} | '
        f'model L={c.model.num_layers} d={c.model.d_model} H={c.model.num_heads} '
        f'K={c.model.num_kv_heads} F={c.model.mlp_dim} V={c.model.vocab_size} | '
        f'batch {c.batch_size} x seq {c.seq_len} | {c.model.dtype}')
  print('# bytes sent per device per step: ring-equivalent (see training/perf.collective_bytes)')
  header = (f"{'mesh':<28} {'tokens/s':>9} {'params+opt MiB':>15} {'step mem MiB':>13} "
            f"{'sent MiB':>9} {'all-reduce':>11} {'all-gather':>11} {'red-scatter':>11}")
  print(header)
  # Uniform random tokens (data.source=synthetic): the step costs the same for any tokens.
  batch = next(data_lib.make_train_iterator(_synthetic(c)))
  results = {}
  for sizes in meshes:
    cfg = c.copy_and_resolve_references()
    cfg.mesh.update({'data': 1, 'fsdp': 1, 'context': 1, 'tensor': 1, **sizes})
    name = ' x '.join(f'{k}={v}' for k, v in sizes.items())
    try:
      program = build_program(cfg, mesh_lib.make_mesh(cfg.mesh))
    except ValueError as e:
      print(f'{name:<28} skipped: {e}')
      continue
    state = program.init_state()
    gb = program.global_batch(batch)
    compiled = program.train_step.lower(state, gb).compile()
    holder = {'state': state}

    def one_step(compiled=compiled, gb=gb, holder=holder):
      holder['state'], m = compiled(holder['state'], gb)
      jax.block_until_ready(m)

    t = perf.time_call(one_step, repeats=flags.FLAGS.steps)
    comm = perf.collective_bytes(compiled.as_text(), n)
    sb = state_bytes_per_device(holder['state'])
    results[name] = sb
    print(f"{name:<28} {c.batch_size * c.seq_len / t['median']:>9,.0f} {sb / 2**20:>15.2f} "
          f"{perf.compiled_memory_bytes(compiled) / 2**20:>13.1f} {comm['total'] / 2**20:>9.2f} "
          f"{comm['all-reduce'] / 2**20:>11.2f} {comm['all-gather'] / 2**20:>11.2f} "
          f"{comm['reduce-scatter'] / 2**20:>11.2f}")
  if 'data=8' in results and 'fsdp=8' in results:
    print(f"fsdp=8 / data=8 params+optimizer bytes per device: "
          f"{results['fsdp=8'] / results['data=8']:.3f}")


if __name__ == '__main__':
  from training.safety.errors import run_cli
  run_cli(lambda: app.run(main))
